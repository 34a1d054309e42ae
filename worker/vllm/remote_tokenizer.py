"""Tokenize exactly as a vLLM server does: its ``/tokenize`` endpoint, with an LRU cache.

The router computes block hashes from token ids, so its tokens must be the server's
tokens, byte for byte: a different tokenizer (or chat template, or special-token
handling) silently turns every prefix hit into a miss. Two ways to get them:

* :class:`RemoteTokenizer`: ask the server (``POST /tokenize``), cache the answers;
  one round trip per distinct prompt text, none for a repeat;
* a Hugging Face ``tokenizers`` JSON file (the model's ``tokenizer.json``) loaded
  locally by ``core.tokenizer.load_tokenizer``; :func:`verify_router_tokenizer` proves at
  start-up that it agrees with the server on a set of probe texts.

Why it matters even though hit *accounting* survives a mismatch: the router sends token
ids, vLLM caches and reports exactly those ids, so predicted and reported hits agree
whatever the tokenizer. But the model then reads ids from another vocabulary (garbage
output, or HTTP 400 for ids beyond the vocabulary), and requests that reach vLLM as text
by another path are tokenized differently and share no blocks with kvr's.

Both expose ``encode(text) -> list[int]``; :class:`RemoteTokenizer` satisfies
``core.tokenizer.Tokenizer`` (``name``, ``encode``, ``decode``, ``output_vocab``), so the router
can use it wherever it takes a tokenizer. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from worker.vllm.openai_client import OpenAIClient

logger = logging.getLogger(__name__)

DEFAULT_CACHE_ENTRIES = 4096

#: Texts that exercise whitespace, punctuation, digits, non-ASCII and special-looking strings.
PROBE_TEXTS = (
    "Hello, world!",
    "  leading spaces and\ttabs\nand newlines\n\n",
    "The year 2026: 3.14159 × 42 = 131.95 (approx.)",
    "日本語のテキストと emoji 🚀 mixed with ASCII",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
    "def f(x):\n    return x ** 2  # code",
)


_COMMON_WORDS = ("the", "of", "and", "to", "in", "is", "it", "was", "for", "on", "are", "as", "at", "by", "be")


class TokenizerMismatchError(RuntimeError):
    """The local tokenizer and the server disagree: hashes would never match."""


class RemoteTokenizer:
    """``encode(text)`` through the server's ``/tokenize``; answers kept in an LRU of ``cache_entries``."""

    def __init__(
        self,
        *,
        client: OpenAIClient,
        model: str,
        add_special_tokens: bool = True,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
    ) -> None:
        if cache_entries < 0:
            raise ValueError("cache_entries must be >= 0")
        self._client = client
        self.model = model
        self.add_special_tokens = add_special_tokens
        self.cache_entries = cache_entries
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()
        self._output_vocab: tuple[int, ...] | None = None
        self.name = f"vllm:{client.base_url}/tokenize"
        self.hits = 0
        self.misses = 0

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the server tokenizes a completion prompt."""
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                self.hits += 1
                return list(cached)
            self.misses += 1
        # The HTTP call runs unlocked: concurrent misses for one text cost two calls, never a stall.
        tokens = self._client.tokenize(text, model=self.model, add_special_tokens=self.add_special_tokens)
        if self.cache_entries:
            with self._lock:
                self._cache[text] = tuple(tokens)
                self._cache.move_to_end(text)
                while len(self._cache) > self.cache_entries:
                    self._cache.popitem(last=False)
        return tokens

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (``POST /detokenize``; not cached)."""
        return self._client.detokenize(ids, model=self.model)

    def output_vocab(self) -> tuple[int, ...]:
        """Ids of common short words that are one token each on this server (asked once)."""
        if self._output_vocab is None:
            ids = []
            for word in _COMMON_WORDS:
                tokens = self._client.tokenize(" " + word, model=self.model, add_special_tokens=False)
                if len(tokens) == 1:
                    ids.append(tokens[0])
            self._output_vocab = tuple(ids)
        return self._output_vocab

    @property
    def cached_entries(self) -> int:
        """Texts whose tokens are cached (no ``__len__``: an empty cache must not make the tokenizer falsy)."""
        return len(self._cache)


def check_tokenizer_matches(
    local_encode: Callable[[str], list[int]],
    remote: RemoteTokenizer,
    *,
    probes: Sequence[str] = PROBE_TEXTS,
) -> None:
    """Raise :class:`TokenizerMismatchError` naming the first probe text the two tokenize differently."""
    for text in probes:
        local = list(local_encode(text))
        served = remote.encode(text)
        if local != served:
            raise TokenizerMismatchError(
                f"tokenizer mismatch on probe {text!r}: local {local[:12]}... ({len(local)} tokens) vs "
                f"server {served[:12]}... ({len(served)} tokens). The router must tokenize with the "
                f"server's tokenizer (the model's tokenizer.json, same add_special_tokens) or every "
                f"prefix hit becomes a miss.")
    logger.info("tokenizer agrees with the server on %d probe texts", len(probes))


def verify_router_tokenizer(spec: str | None, *, client: OpenAIClient, model: str,
                            probes: Sequence[str] = PROBE_TEXTS) -> None:
    """Check the tokenizer the router uses (``core.tokenizer.load_tokenizer(spec)``) against the server.

    kvr's tokenizers add no special tokens, so they are compared with ``/tokenize`` without
    them; a server that prepends special tokens (a BOS) to text prompts is reported at WARNING.
    """
    from core.tokenizer import load_tokenizer

    local = load_tokenizer(spec)
    check_tokenizer_matches(local.encode, RemoteTokenizer(client=client, model=model, add_special_tokens=False),
                            probes=probes)
    plain = client.tokenize(probes[0], model=model, add_special_tokens=False)
    special = client.tokenize(probes[0], model=model, add_special_tokens=True)
    if plain != special:
        logger.warning("vLLM adds special tokens to text prompts (%s... vs %s...); kvr's tokenizer %s does not: "
                       "prompts routed by kvr reach the model without them", special[:3], plain[:3], local.name)


def load_router_tokenizer(spec: str | None):
    """The router's tokenizer from one option value.

    ``None`` / ``"builtin"``: kvr's built-in tokenizer (emulated fleets only: its ids are not a
    real model's); a path: that ``tokenizer.json`` (``core.tokenizer.HFTokenizer``); an
    ``http(s)://`` URL: that vLLM server's ``/tokenize`` through a :class:`RemoteTokenizer`
    for its first served model, with special tokens as vLLM adds them to a text prompt.
    """
    from core.tokenizer import load_tokenizer

    if spec is not None and spec.startswith(("http://", "https://")):
        client = OpenAIClient(base_url=spec)
        base = [card.id for card in client.models() if card.parent is None]
        if not base:
            raise RuntimeError(f"{spec}/v1/models lists no model to tokenize for")
        return RemoteTokenizer(client=client, model=base[0], add_special_tokens=True)
    return load_tokenizer(spec)
