"""worker/remote_tokenizer.py: /tokenize with an LRU cache, and the start-up agreement check."""

from __future__ import annotations

import pytest

from tests.fakes.fake_vllm import FakeVllm, fake_tokenize
from worker.openai_client import OpenAIClient
from worker.remote_tokenizer import (
    PROBE_TEXTS,
    RemoteTokenizer,
    TokenizerMismatchError,
    check_tokenizer_matches,
    load_tokenizer_file,
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
    assert len(tok) == 2 and fake.tokenize_calls == 3
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


def test_tokenizer_file_errors_are_clear(tmp_path):
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="needs the 'tokenizers' package"):
            load_tokenizer_file(tmp_path / "tokenizer.json")
    else:
        with pytest.raises(FileNotFoundError):
            load_tokenizer_file(tmp_path / "missing.json")
