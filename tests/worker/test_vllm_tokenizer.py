"""worker/vllm/remote_tokenizer.py: /tokenize with an LRU cache, and the start-up agreement check."""

from __future__ import annotations

import pytest

from core.tokenizer import BuiltinTokenizer, Tokenizer
from tests.fakes.fake_vllm import FakeVllm, fake_tokenize
from worker.vllm.openai_client import OpenAIClient
from worker.vllm.remote_tokenizer import (
    PROBE_TEXTS,
    RemoteTokenizer,
    TokenizerMismatchError,
    check_tokenizer_matches,
    load_router_tokenizer,
    verify_router_tokenizer,
)


@pytest.fixture
def fake():
    with FakeVllm() as server:
        yield server


def test_remote_tokens_equal_the_servers_and_repeats_are_cached(fake):
    tok = RemoteTokenizer(client=OpenAIClient(base_url=fake.url), model=fake.model, cache_entries=2)
    assert tok.encode("a b c") == fake_tokenize("a b c")
    assert tok.encode("a b c") == fake_tokenize("a b c")
    assert (fake.tokenize_calls, tok.hits, tok.misses) == (1, 1, 1)
    tok.encode("d e")
    tok.encode("a b c")  # refreshes "a b c": "d e" is now the oldest
    tok.encode("f")  # evicts "d e"
    assert tok.cached_entries == 2 and fake.tokenize_calls == 3
    tok.encode("a b c")
    assert fake.tokenize_calls == 3
    tok.encode("d e")
    assert fake.tokenize_calls == 4


def test_cached_answers_are_not_aliased(fake):
    tok = RemoteTokenizer(client=OpenAIClient(base_url=fake.url), model=fake.model)
    first = tok.encode("x y")
    first.append(999)
    assert tok.encode("x y") == fake_tokenize("x y")


def test_without_special_tokens(fake):
    tok = RemoteTokenizer(client=OpenAIClient(base_url=fake.url), model=fake.model, add_special_tokens=False)
    assert tok.encode("x y") == fake_tokenize("x y", add_special_tokens=False)


def test_check_passes_for_the_same_tokenizer_and_names_the_first_disagreement(fake):
    remote = RemoteTokenizer(client=OpenAIClient(base_url=fake.url), model=fake.model)
    check_tokenizer_matches(fake_tokenize, remote)

    def off_by_bos(text: str) -> list[int]:
        return fake_tokenize(text, add_special_tokens=False)

    with pytest.raises(TokenizerMismatchError, match="Hello, world!"):
        check_tokenizer_matches(off_by_bos, remote)
    assert PROBE_TEXTS[0] == "Hello, world!"


def test_router_tokenizer_must_match_the_server(fake, caplog):
    client = OpenAIClient(base_url=fake.url)
    with pytest.raises(TokenizerMismatchError, match="tokenizer mismatch on probe 'Hello, world!'"):
        verify_router_tokenizer("builtin", client=client, model=fake.model)  # kvr's built-in ≠ the model's


def test_router_tokenizer_file_needs_the_package_or_the_file(fake, tmp_path):
    client = OpenAIClient(base_url=fake.url)
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="'tokenizers' package is not installed"):
            verify_router_tokenizer(str(tmp_path / "tokenizer.json"), client=client, model=fake.model)
    else:
        # tokenizers reports a missing file as a bare Exception: there is no narrower type to expect.
        with pytest.raises(Exception):  # noqa: B017
            verify_router_tokenizer(str(tmp_path / "missing.json"), client=client, model=fake.model)


def test_remote_tokenizer_is_a_core_tokenizer(fake):
    tok = RemoteTokenizer(client=OpenAIClient(base_url=fake.url), model=fake.model, add_special_tokens=False)
    assert isinstance(tok, Tokenizer)
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    assert tok.output_vocab() == tuple(fake_tokenize(" " + w, add_special_tokens=False)[0]
                                       for w in ("the", "of", "and", "to", "in", "is", "it", "was", "for", "on",
                                                 "are", "as", "at", "by", "be"))


def test_router_tokenizer_from_one_option_value(fake):
    remote = load_router_tokenizer(fake.url)
    assert isinstance(remote, RemoteTokenizer) and remote.model == fake.model and remote  # truthy when empty
    assert remote.encode("two words") == fake_tokenize("two words")  # with the BOS vLLM adds to text prompts
    assert isinstance(load_router_tokenizer(None), BuiltinTokenizer)
    assert isinstance(load_router_tokenizer("builtin"), BuiltinTokenizer)
