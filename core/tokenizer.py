"""Tokenizers shared by the router and the emulated engine.

``BuiltinTokenizer`` needs no vocabulary file and gives the same ids in every process:

1. The text is split into pieces the way GPT-2's pre-tokenizer does: a word with its
   leading space (`` hello``), up to 3 digits, a run of punctuation, a whitespace run.
2. A piece of lowercase ASCII letters (with its leading space) is cut into chunks of
   at most 6 characters, packed 5 bits a character into ids ``0x80000000 |
   symbols`` (the range no UTF-8 text reaches). Any other piece is cut into chunks of
   at most 4 UTF-8 bytes at character boundaries, whose id is those bytes read as a
   big-endian unsigned integer. Every id is below 2**32.

So ids are reversible without any table: ``decode(encode(text)) == text`` for every
text (NUL characters become U+FFFD), and ``encode(decode(ids)) == ids`` for ids that
``encode`` produced, which includes every id the emulated engine generates (short
English words with a leading space, each its own piece). English prose comes out at
about 3.7 characters per token and technical Markdown at about 3 (real BPE
vocabularies: about 4). Like a real
tokenizer, extending a text only changes the tokens of its last piece, so texts that
share a prefix share their leading tokens and therefore their KV blocks.

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
_MAX_CHUNK_BYTES = 4

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


_COMPACT_FLAG = 0x8000_0000  # ids 0x80000000..0xBFFFFFFF: packed lowercase words
_COMPACT_CHARS = 6
_COMPACT_SYMBOL = {ch: i + 1 for i, ch in enumerate(" abcdefghijklmnopqrstuvwxyz")}
_COMPACT_CHAR = {v: k for k, v in _COMPACT_SYMBOL.items()}
_LOWER_WORD = re.compile(r" ?[a-z]+")


def _compact_id(chunk: str) -> int:
    value = 0
    for k, ch in enumerate(chunk):
        value |= _COMPACT_SYMBOL[ch] << (25 - 5 * k)
    return _COMPACT_FLAG | value


def _bytes_id(chunk: str) -> int:
    # A UTF-8 chunk never starts with a continuation byte (0x80-0xBF), so these ids
    # never fall in the compact range.
    return int.from_bytes(chunk.encode("utf-8"), "big")


@lru_cache(maxsize=1 << 16)
def _id_text(token_id: int) -> bytes:
    if token_id >> 30 == 2:
        chars = []
        for k in range(_COMPACT_CHARS):
            sym = (token_id >> (25 - 5 * k)) & 31
            if sym == 0:
                break
            chars.append(_COMPACT_CHAR.get(sym, "\ufffd"))
        return "".join(chars).encode("utf-8")
    return token_id.to_bytes((token_id.bit_length() + 7) // 8 or 1, "big")


class BuiltinTokenizer:
    """Deterministic, table-free, reversible tokenizer (see module docstring)."""

    name = "builtin"

    def encode(self, text: str) -> list[int]:
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")
        ids: list[int] = []
        lower = _LOWER_WORD.fullmatch
        for piece in _PIECE.findall(text):
            if lower(piece):
                if len(piece) <= _COMPACT_CHARS:
                    ids.append(_compact_id(piece))
                else:
                    ids.extend(_compact_id(piece[i : i + _COMPACT_CHARS]) for i in range(0, len(piece), _COMPACT_CHARS))
            elif len(piece) <= 4 and len(piece.encode("utf-8")) <= _MAX_CHUNK_BYTES:
                ids.append(_bytes_id(piece))
            else:
                ids.extend(_bytes_id(c) for c in _chunks(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        try:
            raw = b"".join(_id_text(i) for i in ids)
        except (OverflowError, AttributeError, TypeError) as exc:
            raise ValueError("token ids must be non-negative integers") from exc
        return raw.decode("utf-8", errors="replace")

    def output_vocab(self) -> tuple[int, ...]:
        return default_output_vocab()


def _chunks(piece: str) -> Iterable[str]:
    """Cut a piece into runs of <= 4 UTF-8 bytes without splitting a character."""
    start = 0
    size = 0
    for i, ch in enumerate(piece):
        n = len(ch.encode("utf-8"))
        if size + n > _MAX_CHUNK_BYTES:
            yield piece[start:i]
            start, size = i, 0
        size += n
    if start < len(piece):
        yield piece[start:]


@lru_cache(maxsize=1)
def default_output_vocab() -> tuple[int, ...]:
    """The built-in tokenizer's ids of the engine's output words (one token each)."""
    return tuple(_compact_id(" " + w) for w in _OUTPUT_WORDS)


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
        return self._tok.decode(list(ids), skip_special_tokens=False)

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
