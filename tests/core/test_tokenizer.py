"""The built-in tokenizer: reversible, stable, prefix-friendly; the HF wrapper's error."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.tokenizer import (
    BUILTIN_VOCAB_SIZE,
    BuiltinTokenizer,
    apply_chat_template,
    default_output_vocab,
    load_tokenizer,
)

TOK = BuiltinTokenizer()
PROSE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair."
)


def _word(variant: int, letters: str) -> int:
    """A word chunk's id from the documented layout: after 256 byte ids and 65,536 byte-pair ids,
    4 variants (bit 1: leading space, bit 0: capital) of the 18,278 strings of 1-3 letters."""
    offset = {1: 0, 2: 26, 3: 26 + 26**2}[len(letters)]
    value = 0
    for ch in letters:
        value = value * 26 + ord(ch) - ord("a")
    return 256 + 256**2 + variant * 18_278 + offset + value


def test_pinned_ids() -> None:
    # Words go in chunks of <= 3 letters (the first keeps the space and the capital), digit groups
    # are one id, anything else is its UTF-8 bytes two to an id.
    assert TOK.encode("Hello world!") == [_word(1, "hel"), _word(0, "lo"), _word(2, "wor"), _word(0, "ld"), ord("!")]
    assert TOK.encode(" beautiful") == [_word(2, "bea"), _word(0, "uti"), _word(0, "ful")]
    digits_base = 256 + 256**2 + 4 * 18_278
    assert TOK.encode(" 042") == [digits_base + 1110 + 110 + 42]
    assert TOK.encode("7") == [digits_base + 7]
    assert TOK.encode("HTTP") == [256 + (ord("H") << 8 | ord("T")), 256 + (ord("T") << 8 | ord("P"))]
    assert TOK.encode("é") == [256 + 0xC3A9]
    assert TOK.decode([_word(0, "t")]) == "t"
    assert BUILTIN_VOCAB_SIZE == digits_base + 2 * 1110 == 141_124


def test_ids_stay_in_a_realistic_vocabulary() -> None:
    # vllm-router refuses token ids >= 2**31; real vocabularies stay below about 2**18.
    text = PROSE + " Zebra ZEBRA 999 \u4e2d\u6587 naïve \U0001F600 ~~~ \n\t "
    ids = TOK.encode(text)
    assert max(ids) < BUILTIN_VOCAB_SIZE < 2**18 and min(ids) >= 0
    assert max(default_output_vocab()) < BUILTIN_VOCAB_SIZE
    assert TOK.vocab_size == BUILTIN_VOCAB_SIZE
    for bad in (BUILTIN_VOCAB_SIZE, -1, 2**31):
        with pytest.raises(ValueError):
            TOK.decode([bad])


def test_every_word_and_digit_id_is_its_own_piece() -> None:
    # Each word or digit chunk decodes to text that encodes back to that one id (bytes ids only
    # decode: a lone byte pair need not be UTF-8).
    for i in range(BUILTIN_VOCAB_SIZE):
        text = TOK.decode([i])
        assert i < 256 + 256**2 or TOK.encode(text) == [i], (i, text)


def test_english_prose_is_about_three_characters_per_token() -> None:
    ratio = len(PROSE) / len(TOK.encode(PROSE))
    assert 2.8 < ratio < 3.4


@given(st.text(max_size=200))
def test_decode_inverts_encode_for_any_text(text: str) -> None:
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert all(0 <= i < BUILTIN_VOCAB_SIZE for i in ids)
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
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": s, "PATH": ""}).stdout
        for s in ("1", "2")
    }
    assert outs == {str(TOK.encode("Stable ids, naïve café 123456.")) + "\n"}


def test_chat_template_turns_extend_the_previous_prompt_and_answer() -> None:
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    p1 = apply_chat_template(turn1)
    answer = TOK.decode(default_output_vocab()[:5])
    turn2 = turn1 + [{"role": "assistant", "content": answer},
                     {"role": "user", "content": [{"type": "text", "text": "More"}]}]
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


_SEGMENT_TEXT = st.lists(st.sampled_from(["ab", "Q", " ", "\n", "\n\n", " \n", "\t", "7", "!?", "_", "é",
                                          "\u3000", "\r\n", "\x1c"]), max_size=100).map("".join)


@given(st.lists(_SEGMENT_TEXT, max_size=8).map("".join))
def test_segments_split_at_newlines_encode_as_the_whole_text(monkeypatch_text: str) -> None:
    """``encode`` splits at newlines with a non-space on both sides and remembers the segments; the
    result must equal the pre-tokenizer run over the whole text. With the minimum segment at 1
    character, every such newline splits (and every segment is remembered, so a second call reads
    the memo)."""
    import core.tokenizer as tokenizer

    saved = tokenizer._SEGMENT_MIN_CHARS
    tokenizer._SEGMENT_MIN_CHARS = 1
    try:
        whole = tokenizer._encode_pieces(monkeypatch_text)
        assert BuiltinTokenizer().encode(monkeypatch_text) == whole
        assert BuiltinTokenizer().encode(monkeypatch_text) == whole
    finally:
        tokenizer._SEGMENT_MIN_CHARS = saved


def test_a_long_shared_prefix_is_encoded_once() -> None:
    import core.tokenizer as tokenizer

    system = ("You are a helpful assistant. " * 40).rstrip()  # ~1,200 characters, one segment
    tokenizer._memo_segment.cache_clear()
    first = BuiltinTokenizer().encode(system + "\nQuestion one?")
    second = BuiltinTokenizer().encode(system + "\nQuestion two, a longer one?")
    info = tokenizer._memo_segment.cache_info()
    assert (info.hits, info.misses) == (1, 3)  # the system prompt once; each question short: one miss each
    assert first == tokenizer._encode_pieces(system + "\nQuestion one?")
    assert second[: len(first) - 3] == first[: len(first) - 3]
