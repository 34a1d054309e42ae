"""``kvr send``: one request to a router, or an interactive client (``-i``).

Per request it shows the worker chosen, the router's predicted and the
engine's actual cached tokens, and the client-side timings. In interactive
mode each line is a turn of one conversation by default (``--chat``): the
next prompt repeats the history, so its prefix should be cached on the worker
the router picks.
"""

from __future__ import annotations

import itertools
import os
import uuid

import click

from cli.options import load_curve_option

#: Seconds to wait for the router's first reply: it answers every request at once (Routed or an
#: error), so silence this long means nothing is listening (or it refused this client).
DEFAULT_CONNECT_TIMEOUT_S = 3.0


def describe(result) -> str:
    """One line per request: worker, cache, timings (or the error)."""
    if result.error is not None:
        return f"error {result.error.code.value}: {result.error.message}"
    c = result.completion
    r = result.routed
    policy = f" (policy {r.policy}, {r.reason})" if r and r.reason else f" (policy {r.policy})" if r else ""
    parts = [f"worker {c.worker_id}{policy}"]
    predicted = r.predicted_cached_tokens if r else c.predicted_cached_tokens
    parts.append(f"cached {c.cached_tokens}/{c.prompt_tokens} tokens"
                 + (f" (predicted {predicted})" if predicted >= 0 else ""))
    ttft = result.ttft_s
    parts.append(f"TTFT {1000 * ttft:.1f} ms" if ttft is not None else "TTFT –")
    parts.append(f"e2e {1000 * result.e2e_s:.1f} ms" if result.e2e_s is not None else "e2e –")
    parts.append(f"{c.output_tokens} output tokens ({c.finish_reason})")
    if c.retries:
        parts.append(f"{c.retries} retries")
    return ", ".join(parts)


def _parse_tokens(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter("token ids are integers separated by commas or spaces") from None


@click.command("send")
@click.argument("prompt", required=False)
@click.option("--router", "endpoint", default=None, envvar="KVR_ROUTER",
              help="The router's client endpoint (default: the running `kvr up`'s, from its state file).")
@click.option("--tokens", default=None, help="Send these token ids instead of a text prompt ('1,2,3').")
@click.option("--max-tokens", type=int, default=16, show_default=True)
@click.option("--model", default=None)
@click.option("--worker", "worker_id", default=None, help="Bypass the policy and use this worker.")
@click.option("--repeat", type=int, default=1, show_default=True, help="Send the same request this many times.")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds for a whole request (a long generation included).")
@click.option("--connect-timeout", "connect_timeout_s", type=float, default=DEFAULT_CONNECT_TIMEOUT_S,
              show_default=True,
              help="Seconds to wait for the router's first reply; none by then = no router there: exit 1.")
@click.option("-i", "--interactive", is_flag=True, help="Read prompts from stdin, one per line.")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Interactive: each prompt carries the conversation so far (its prefix is reusable).")
@click.option("--show-text", is_flag=True, help="Print the generated text.")
@click.option("--curve-dir", default=None, envvar="KVR_CURVE_DIR", type=click.Path(file_okay=False),
              help="CURVE keys (kvr keys): dial a router started with --curve-dir (docs/security.md).")
@click.option("--curve-key", default="client", show_default=True, help="Name of this client's key pair in --curve-dir.")
def send_cmd(prompt: str | None, endpoint: str | None, tokens: str | None, max_tokens: int, model: str | None,
             worker_id: str | None, repeat: int, timeout_s: float, connect_timeout_s: float, interactive: bool,
             chat: bool, show_text: bool, curve_dir: str | None = None, curve_key: str = "client") -> None:
    """Send PROMPT to the router and print where it went, what was cached and how long it took.

    Without --router (or KVR_ROUTER) it sends to the running `kvr up` (with its CURVE keys when it
    was started with --curve). Exit code: 0, 1 when a request failed or no router answered within
    --connect-timeout, 2 when there is no router to send to.
    """
    from bus.client import NoRouterReply, RouterClient
    from bus.schema import GenerateRequest
    from cli.user_state import require_cluster

    if not interactive and prompt is None and tokens is None:
        raise click.UsageError("give a PROMPT, --tokens, or -i for an interactive session")
    if endpoint is None:
        cluster = require_cluster(instead="--router ENDPOINT (or KVR_ROUTER)")
        endpoint = cluster["client_endpoint"]
        curve_dir = curve_dir or cluster.get("curve_dir")
    session = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    counter = itertools.count(1)
    failures = 0

    def one(text: str | None, ids: list[int] | None) -> object:
        req = GenerateRequest(request_id=f"send-{session}-{next(counter)}", prompt=text, token_ids=ids,
                              max_tokens=max_tokens, model=model, worker_id=worker_id)
        return client.generate(req, timeout_s=timeout_s, first_reply_timeout_s=min(connect_timeout_s, timeout_s))

    curve = load_curve_option(curve_dir, curve_key)
    with RouterClient(endpoint=endpoint, curve=curve) as client:
        if not interactive:
            ids = _parse_tokens(tokens) if tokens is not None else None
            for _ in range(repeat):
                try:
                    result = one(None if ids is not None else prompt, ids)
                except NoRouterReply as exc:
                    raise click.ClickException(str(exc)) from None
                except TimeoutError as exc:
                    # The router answered (else NoRouterReply): the generation is what takes long.
                    raise click.ClickException(f"{exc}; the router at {endpoint} answered but the request did not "
                                               "finish (a longer --timeout?)") from None
                click.echo(describe(result))
                if show_text and result.text:
                    click.echo(result.text)
                failures += result.error is not None
            if failures:
                raise SystemExit(1)
            return
        history = ""
        click.echo(f"kvr interactive client → {endpoint} "
                   f"({'chat: history is resent' if chat else 'independent prompts'}); "
                   "empty line or Ctrl-D quits, /reset clears the history", err=True)
        while True:
            try:
                line = click.prompt("you", default="", show_default=False, prompt_suffix="> ")
            except (EOFError, click.Abort):
                break
            if not line.strip():
                break
            if line.strip() == "/reset":
                history = ""
                click.echo("history cleared")
                continue
            text = f"{history}\nUser: {line}\nAssistant:" if chat else line
            try:
                result = one(text, None)
            except TimeoutError as exc:
                click.echo(f"timeout: {exc}")
                continue
            click.echo(describe(result))
            if show_text and result.text:
                click.echo(result.text)
            if chat and result.error is None:
                history = f"{text}{result.text}"


COMMANDS = [send_cmd]
