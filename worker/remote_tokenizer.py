"""Tokenize exactly as a vLLM server does: its ``/tokenize`` endpoint, with an LRU cache.

The router computes block hashes from token ids, so its tokens must be the server's
tokens, byte for byte: a different tokenizer (or chat template, or special-token
handling) silently turns every prefix hit into a miss. Two ways to get them:

* :class:`RemoteTokenizer`: ask the server (``POST /tokenize``), cache the answers;
  one round trip per distinct prompt text, none for a repeat;
* a Hugging Face ``tokenizers`` JSON file (the model's ``tokenizer.json``) loaded
  locally with :func:`load_tokenizer_file`; :func:`check_tokenizer_matches` proves at
  start-up that it agrees with the server on a set of probe texts.

Both expose ``encode(text) -> list[int]``. Thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from worker.openai_client import OpenAIClient

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

    def __len__(self) -> int:
        return len(self._cache)


class TokenizerFile:
    """A Hugging Face ``tokenizers`` JSON file (needs the optional ``tokenizers`` package)."""

    def __init__(self, path: str | Path, *, add_special_tokens: bool = True) -> None:
        try:
            from tokenizers import Tokenizer  # optional dependency, only for this feature
        except ImportError:
            raise RuntimeError(
                "reading a tokenizer file needs the 'tokenizers' package (pip install tokenizers); "
                "or use the server's /tokenize instead") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        self._tokenizer = Tokenizer.from_file(str(self.path))
        self.add_special_tokens = add_special_tokens

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids)


def load_tokenizer_file(path: str | Path, *, add_special_tokens: bool = True) -> TokenizerFile:
    """Load ``tokenizer.json`` (the file in the model's Hugging Face repository)."""
    return TokenizerFile(path, add_special_tokens=add_special_tokens)


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
