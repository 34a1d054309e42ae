"""Tokenizers shared by the router and the emulated engine.

``BuiltinTokenizer`` needs no vocabulary file and gives the same ids in every process:

1. The text is split into pieces the way GPT-2's pre-tokenizer does: a word with its
   leading space (`` hello``), up to 3 digits, a run of punctuation, a whitespace run.
2. An ASCII word that is lowercase after an optional capital (`` hello``, ``Light``) is cut
   into chunks of at most 3 letters (the first chunk keeps the leading space and the
   capital: `` hel`` ``lo``); an ASCII group of 1-3 digits with its optional space is one
   token; any other piece is its UTF-8 bytes, two to a token.
3. Each kind of chunk has its own id range (``_WORD_BASE``, ``_DIGITS_BASE``, bytes below
   them), numbered arithmetically, so ids are reversible without any table.

Every id is below ``BUILTIN_VOCAB_SIZE`` (141,124): a vocabulary the size of a real
model's (Llama 3: 128,256; Qwen: 151,936). Real vocabularies stay below about 2**18, and
peers check it: vllm-router refuses prompts whose token ids are 2**31 or more.
``decode(encode(text)) == text`` for every text, and ``encode(decode(ids)) == ids`` for
ids that ``encode`` produced, which includes every id the emulated engine generates
(short English words with a leading space, each one token). English prose comes out at
about 3 characters per token and technical Markdown at about 2.3 (real BPE vocabularies:
about 4). Like a real tokenizer, extending a text only changes the tokens of its last
piece, so texts that share a prefix share their leading tokens and therefore their KV
blocks.

``HFTokenizer`` wraps a Hugging Face ``tokenizer.json`` through the optional
``tokenizers`` package.

``apply_chat_template`` renders chat messages to one prompt string; a conversation's
next turn renders to an extension of the previous turn's prompt plus its answer, so
multi-turn chats hit the cache as they do on a real server.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

# GPT-2-style pre-tokenizer: letters, digits (<= 3), punctuation runs, whitespace.
_PIECE = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+| ?_+|\s+(?!\S)|\s+")

# Words the engine draws its output from: each is " " + <= 3 letters, hence one token.
_OUTPUT_WORDS = (
    "the of and to in is it was for on are as his he at by be had not but or you all can her one an has we its "
    "may new our out who now two way use she any day get man see how so no up if my do me big old own set try "
    "ask men run end why far few let put say too yet sun sea air art car cat dog eye war law job oil key tea "
    "red top bed box cup hot low net pay raw six ten age act add aim bad bit buy cut dry due era fan fit fix "
    "fly gap gas god gun hit ice kid lab leg lie lot map mix mom odd pop pot pro row sad sky son tax tie tip"
).split()


@runtime_checkable
class Tokenizer(Protocol):
    """Text to token ids and back."""

    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def output_vocab(self) -> tuple[int, ...]:
        """Ids an emulated engine may generate (each decodes to a word that re-encodes to it)."""
        ...


# Id layout (each range numbered arithmetically; see the module docstring):
#   [0, 256)                      one byte
#   [256, _WORD_BASE)             two bytes, big-endian
#   [_WORD_BASE, _DIGITS_BASE)    a word chunk: 4 variants (leading space? capital?) x 1-3 letters
#   [_DIGITS_BASE, VOCAB)         1-3 ASCII digits, with or without a leading space
_PAIR_BASE = 256
_WORD_BASE = _PAIR_BASE + 256 * 256
_WORD_LETTERS = 3
_LETTER_OFFSETS = (0, 0, 26, 26 + 26**2)  # by length: strings of 1, 2, 3 letters in turn
_LETTER_STRINGS = 26 + 26**2 + 26**3  # 18,278 per variant
_DIGITS_BASE = _WORD_BASE + 4 * _LETTER_STRINGS
_DIGIT_OFFSETS = (0, 0, 10, 110)
_DIGIT_STRINGS = 10 + 100 + 1000  # per variant (with or without a leading space)
#: Ids of the built-in tokenizer are 0 .. BUILTIN_VOCAB_SIZE - 1 (141,124 ids; 2**18 = 262,144).
BUILTIN_VOCAB_SIZE = _DIGITS_BASE + 2 * _DIGIT_STRINGS

_WORD = re.compile(r" ?[A-Za-z][a-z]*")
_DIGITS = re.compile(r" ?[0-9]{1,3}")
_A = ord("a")


def _letters_index(letters: str) -> int:
    """1-3 lowercase letters → 0 .. _LETTER_STRINGS - 1 (shorter strings first)."""
    value = 0
    for ch in letters:
        value = value * 26 + ord(ch) - _A
    return _LETTER_OFFSETS[len(letters)] + value


def _word_ids(piece: str) -> list[int]:
    space = piece[0] == " "
    word = piece[1:] if space else piece
    cap = word[0] <= "Z"
    first = (word[0].lower() if cap else word[0]) + word[1:_WORD_LETTERS]
    ids = [_WORD_BASE + (2 * space + cap) * _LETTER_STRINGS + _letters_index(first)]
    ids.extend(_WORD_BASE + _letters_index(word[i : i + _WORD_LETTERS])
               for i in range(_WORD_LETTERS, len(word), _WORD_LETTERS))
    return ids


def _digits_id(piece: str) -> int:
    space = piece[0] == " "
    digits = piece[1:] if space else piece
    return _DIGITS_BASE + space * _DIGIT_STRINGS + _DIGIT_OFFSETS[len(digits)] + int(digits)


def _bytes_ids(piece: str) -> list[int]:
    raw = piece.encode("utf-8")
    ids = [_PAIR_BASE + (raw[i] << 8 | raw[i + 1]) for i in range(0, len(raw) - 1, 2)]
    if len(raw) % 2:
        ids.append(raw[-1])
    return ids


def _from_offsets(index: int, offsets: tuple[int, ...]) -> tuple[int, int]:
    """Inverse of the offset numbering: ``(length, value)``."""
    length = 3 if index >= offsets[3] else 2 if index >= offsets[2] else 1
    return length, index - offsets[length]


def _piece_ids(piece: str) -> tuple[int, ...]:
    """One pre-tokenizer piece's ids."""
    if _WORD.fullmatch(piece):
        return tuple(_word_ids(piece))
    if _DIGITS.fullmatch(piece):
        return (_digits_id(piece),)
    return tuple(_bytes_ids(piece))


_MEMO_PIECE_CHARS = 32  # short pieces (words, punctuation) repeat: memoized; a long run is not kept
_memo_piece_ids = lru_cache(maxsize=1 << 16)(_piece_ids)


@lru_cache(maxsize=1 << 16)
def _id_text(token_id: int) -> bytes:
    if not 0 <= token_id < BUILTIN_VOCAB_SIZE:
        raise ValueError(f"token id {token_id} is outside the built-in vocabulary [0, {BUILTIN_VOCAB_SIZE})")
    if token_id < _PAIR_BASE:
        return bytes((token_id,))
    if token_id < _WORD_BASE:
        return (token_id - _PAIR_BASE).to_bytes(2, "big")
    if token_id < _DIGITS_BASE:
        variant, index = divmod(token_id - _WORD_BASE, _LETTER_STRINGS)
        length, value = _from_offsets(index, _LETTER_OFFSETS)
        chars = [chr(_A + value // 26**k % 26) for k in reversed(range(length))]
        if variant & 1:
            chars[0] = chars[0].upper()
        return ((" " if variant & 2 else "") + "".join(chars)).encode()
    space, index = divmod(token_id - _DIGITS_BASE, _DIGIT_STRINGS)
    length, value = _from_offsets(index, _DIGIT_OFFSETS)
    return ((" " if space else "") + str(value).zfill(length)).encode()


def _encode_pieces(text: str) -> list[int]:
    ids: list[int] = []
    memo, limit = _memo_piece_ids, _MEMO_PIECE_CHARS
    for piece in _PIECE.findall(text):
        ids.extend(memo(piece) if len(piece) <= limit else _piece_ids(piece))
    return ids


#: Segments shorter than this are not split off or remembered (the lookup would cost what it saves).
_SEGMENT_MIN_CHARS = 256
#: Longer segments are encoded every time: the memo's memory stays below ~256 × 16 k characters.
_SEGMENT_MAX_CHARS = 16_384
_memo_segment = lru_cache(maxsize=256)(lambda segment: tuple(_encode_pieces(segment)))


def _encode_segment(segment: str) -> Sequence[int]:
    return _memo_segment(segment) if len(segment) <= _SEGMENT_MAX_CHARS else _encode_pieces(segment)


class BuiltinTokenizer:
    """Deterministic, table-free, reversible tokenizer (see module docstring)."""

    name = "builtin"
    vocab_size = BUILTIN_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; a prompt's long lines (a shared system prompt) are remembered whole.

        Every position right after a ``"\n"`` with a non-space on both sides of it is a boundary of
        the pre-tokenizer (no piece spans it: only whitespace pieces hold a newline, and this one's
        run is the newline alone), so the text encodes as the concatenation of its segments between
        such positions. Segments repeat across requests (system prompts, few-shot examples):
        the pre-tokenizer's regex is ~0.4 µs a piece, ~200 µs for a 3,500-character prompt."""
        if len(text) < _SEGMENT_MIN_CHARS:
            return _encode_pieces(text)
        ids: list[int] = []
        start, find, end = 0, text.find, len(text) - 1
        nl = find("\n", 1)
        while 0 < nl < end:
            if not text[nl - 1].isspace() and not text[nl + 1].isspace() and nl + 1 - start >= _SEGMENT_MIN_CHARS:
                ids += _encode_segment(text[start:nl + 1])
                start = nl + 1
            nl = find("\n", nl + 1)
        ids += _encode_segment(text[start:])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        try:
            raw = b"".join(_id_text(i) for i in ids)
        except TypeError as exc:
            raise ValueError("token ids must be integers") from exc
        return raw.decode("utf-8", errors="replace")

    def output_vocab(self) -> tuple[int, ...]:
        return default_output_vocab()


@lru_cache(maxsize=1)
def default_output_vocab() -> tuple[int, ...]:
    """The built-in tokenizer's ids of the engine's output words (one token each)."""
    return tuple(_word_ids(" " + w)[0] for w in _OUTPUT_WORDS)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``, via the optional ``tokenizers`` package."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer as _HF  # optional dependency
        except ImportError as exc:
            raise RuntimeError(
                "a tokenizer file was given but the 'tokenizers' package is not installed; "
                "install it (pip install tokenizers) or use the built-in tokenizer"
            ) from exc
        self._tok = _HF.from_file(path)
        self.name = f"hf:{path}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))  # untyped optional package

    def output_vocab(self) -> tuple[int, ...]:
        ids: list[int] = []
        for w in _OUTPUT_WORDS:
            enc = self.encode(" " + w)
            # One token that decodes back to the word (not an unknown-word id), each id once.
            if len(enc) == 1 and self.decode(enc).strip() == w and enc[0] not in ids:
                ids.append(enc[0])
        if not ids:
            raise RuntimeError(f"{self.name}: no common English word is a single token; pass output_vocab explicitly")
        return tuple(ids)


def load_tokenizer(spec: str | None) -> Tokenizer:
    """``None`` / ``"builtin"`` → the built-in tokenizer; anything else is a tokenizer.json path."""
    if spec is None or spec == "builtin":
        return BuiltinTokenizer()
    return HFTokenizer(spec)


def apply_chat_template(messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
    """Render chat messages as ``<|role|>\\ncontent\\n`` each, then ``<|assistant|>\\n``.

    ``content`` may be a string or OpenAI content parts (the text parts are joined).
    """
    out: list[str] = []
    for m in messages:
        role = str(m.get("role", "user"))
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
        out.append(f"<|{role}|>\n{content if content is not None else ''}\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)
