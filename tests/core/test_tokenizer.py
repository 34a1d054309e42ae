"""The built-in tokenizer: reversible, stable, prefix-friendly; the HF wrapper's error."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.tokenizer import BuiltinTokenizer, apply_chat_template, default_output_vocab, load_tokenizer

TOK = BuiltinTokenizer()
PROSE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair."
)


def test_pinned_ids() -> None:
    # Lowercase words pack into 0x80000000 | 5-bit symbols; anything else is its UTF-8 bytes.
    assert TOK.encode("Hello world!") == [int.from_bytes(b"Hell", "big"), ord("o"), 0x80000000 | (1 << 25) | (24 << 20) | (16 << 15) | (19 << 10) | (13 << 5) | 5, ord("!")]
    assert TOK.encode(" beautiful") == [TOK.encode(" beaut")[0], TOK.encode("iful")[0]]
    assert TOK.decode([0x80000000 | (21 << 25)]) == "t"


def test_english_prose_is_about_four_characters_per_token() -> None:
    ratio = len(PROSE) / len(TOK.encode(PROSE))
    assert 3.3 < ratio < 4.5


@given(st.text(max_size=200))
def test_decode_inverts_encode_for_any_text_without_nul(text: str) -> None:
    text = text.replace("\x00", "")
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert all(0 <= i < 2**32 for i in ids)
    assert TOK.encode(TOK.decode(ids)) == ids


def test_generated_words_round_trip_token_for_token() -> None:
    rng = random.Random(3)
    ids = [rng.choice(default_output_vocab()) for _ in range(300)]
    assert TOK.encode(TOK.decode(ids)) == ids
    assert len(set(default_output_vocab())) == len(default_output_vocab())


def test_extending_a_text_keeps_all_but_the_last_piece() -> None:
    a = TOK.encode(PROSE)
    b = TOK.encode(PROSE + " And then some more words follow.")
    assert b[: len(a) - 1] == a[:-1]


def test_stable_across_processes() -> None:
    code = "from core.tokenizer import BuiltinTokenizer as T; print(T().encode('Stable ids, naïve café 123456.'))"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": s, "PATH": ""}).stdout
        for s in ("1", "2")
    }
    assert outs == {str(TOK.encode("Stable ids, naïve café 123456.")) + "\n"}


def test_chat_template_turns_extend_the_previous_prompt_and_answer() -> None:
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    p1 = apply_chat_template(turn1)
    answer = TOK.decode(default_output_vocab()[:5])
    turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": [{"type": "text", "text": "More"}]}]
    p2 = apply_chat_template(turn2)
    assert p1 == "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    assert p2.startswith(p1 + answer)
    ids1, ids2 = TOK.encode(p1), TOK.encode(p2)
    assert ids2[: len(ids1) + 5] == ids1 + list(default_output_vocab()[:5])


def test_hf_tokenizer_without_the_package_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(RuntimeError, match="tokenizers"):
        load_tokenizer("/nonexistent/tokenizer.json")
    assert isinstance(load_tokenizer(None), BuiltinTokenizer)


def test_hf_tokenizer_file_round_trips_and_offers_single_token_output_words(tmp_path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    words = ["[UNK]", "hello", "world", "the", "of", "and", "to", "in"]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = load_tokenizer(str(path))
    assert hf.name == f"hf:{path}"
    assert hf.encode("hello world the") == [1, 2, 3]
    assert hf.decode([1, 2]) == "hello world"
    # " the", " of", ... are one id each here; unknown words ([UNK]) never become output.
    assert hf.output_vocab() == (3, 4, 5, 6, 7)
