"""The real-vLLM adapter: a kvr worker in front of a vLLM server (``kvr worker --engine vllm``).

It registers the server with the router, relays its OpenAI API (``openai_client``,
``openai_stream``), forwards its KV events unchanged, checks its configuration against the
router's (``checks``), tokenizes through it (``remote_tokenizer``) and exports its metrics."""
