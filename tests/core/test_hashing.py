"""kvr's own block hash: golden vectors and chaining rules."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.hashing import ROOT_PARENT_HASH, block_hashes, external_hash_key, hash_block

# Golden vectors: these values are part of kvr's contract (Redis mirrors and
# replicas of different versions must agree). Changing them is a breaking change.
GOLDEN_ROOT = 11110158557218007092
GOLDEN_0_40 = [16650640885666927897, 15252673793655536888]


def test_root_parent_hash_is_pinned() -> None:
    assert ROOT_PARENT_HASH == GOLDEN_ROOT


def test_golden_vectors_for_tokens_0_to_39() -> None:
    # 40 tokens at block size 16 = two full blocks; the 8 trailing tokens get no hash.
    assert block_hashes(list(range(40)), block_size=16) == GOLDEN_0_40


def test_same_value_in_a_fresh_process_with_another_hash_seed() -> None:
    code = "from core.hashing import block_hashes; print(block_hashes(list(range(40)), block_size=16))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "987", "PATH": ""}
    ).stdout
    assert out.strip() == str(GOLDEN_0_40)


def test_chain_continues_from_a_parent() -> None:
    tokens = list(range(64))
    full = block_hashes(tokens, block_size=16)
    tail = block_hashes(tokens[32:], block_size=16, parent_hash=full[1])
    assert tail == full[2:]
    assert hash_block(full[0], tokens[16:32]) == full[1]


def test_extra_keys_change_every_block() -> None:
    tokens = list(range(32))
    plain = block_hashes(tokens, block_size=16)
    lora = block_hashes(tokens, block_size=16, extra_keys=["sql-lora"])
    assert len(lora) == 2 and all(a != b for a, b in zip(plain, lora))
    assert block_hashes(tokens, block_size=16, extra_keys=["sql-lora"]) == lora


def test_bad_tokens_and_block_size_raise_value_error() -> None:
    with pytest.raises(ValueError):
        block_hashes([-1] * 16, block_size=16)
    with pytest.raises(ValueError):
        block_hashes([2**32] * 16, block_size=16)
    with pytest.raises(ValueError):
        block_hashes([1] * 16, block_size=0)


def test_max_blocks_truncates() -> None:
    assert block_hashes(list(range(64)), block_size=16, max_blocks=2) == block_hashes(list(range(32)), block_size=16)


def test_external_hash_key_normalises_to_uint64() -> None:
    digest = bytes.fromhex("d5f771f84a1d57ab2e1e352b70cb180b96d2a45153e74ef1d185d5be9c886ff5")
    assert external_hash_key(digest) == 15097708340476145653  # vLLM's int form of the same block
    assert external_hash_key(15097708340476145653) == 15097708340476145653
    assert external_hash_key(-1) == 2**64 - 1


@given(st.lists(st.integers(0, 2**32 - 1), max_size=80), st.integers(1, 20))
def test_prefix_property(tokens: list[int], block_size: int) -> None:
    # A prompt's hashes are a prefix of any longer prompt's hashes that extends it.
    hashes = block_hashes(tokens, block_size=block_size)
    assert len(hashes) == len(tokens) // block_size
    assert block_hashes(tokens + [7] * block_size, block_size=block_size)[: len(hashes)] == hashes
