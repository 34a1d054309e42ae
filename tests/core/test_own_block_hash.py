"""kvr's own block hash: golden vectors and chaining rules."""

from __future__ import annotations

import random
import struct
import subprocess
import sys

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from core.own_block_hash import (
    HASH_SEED,
    ROOT_PARENT_HASH,
    block_hashes,
    external_hash_key,
    extra_key_bytes,
    hash_block,
    request_block_hashes,
)

# Golden vectors: these values are part of kvr's contract (Redis mirrors and
# replicas of different versions must agree). Changing them is a breaking change (bump
# core.own_block_hash.HASH_SCHEME). Derived from the definition with xxhash alone:
# root = xxh3_64(b"kvr-root-block", seed=0x6B7672); h0 = xxh3_64(pack("<16I", 0..15), seed=root);
# h1 = xxh3_64(pack("<16I", 16..31), seed=h0) (test_golden_vectors_follow_the_definition).
GOLDEN_ROOT = 11110158557218007092
GOLDEN_0_40 = [656807252370501743, 11930174801633836052]


def _by_definition(tokens: list[int], block_size: int, extra: bytes = b"") -> list[int]:
    """The module docstring's definition, written with xxhash and struct only."""
    parent = xxhash.xxh3_64_intdigest(b"kvr-root-block", seed=0x6B7672)
    out = []
    for i in range(len(tokens) // block_size):
        block = tokens[i * block_size:(i + 1) * block_size]
        parent = xxhash.xxh3_64_intdigest(struct.pack(f"<{block_size}I", *block) + extra, seed=parent)
        out.append(parent)
    return out


def test_golden_vectors_follow_the_definition() -> None:
    assert HASH_SEED == 0x6B7672
    assert _by_definition(list(range(40)), 16) == GOLDEN_0_40


@given(st.lists(st.integers(0, 2**32 - 1), max_size=70), st.integers(1, 17),
       st.sampled_from([None, ["lora"], ["a", 3]]))
def test_block_hashes_follow_the_definition(tokens: list[int], block_size: int, extra) -> None:
    assert block_hashes(tokens, block_size=block_size, extra_keys=extra) == _by_definition(
        tokens, block_size, extra_key_bytes(extra))


def test_no_collisions_among_many_random_blocks_and_prefixes() -> None:
    # 2**18 random one-block prompts and as many two-block prompts sharing one first block:
    # every hash distinct (a 64-bit hash collides here with probability ~2**-28).
    rng = random.Random(5)
    firsts = [block_hashes([rng.getrandbits(32) for _ in range(16)], block_size=16)[0] for _ in range(2**18)]
    shared = [rng.getrandbits(32) for _ in range(16)]
    seconds = [block_hashes(shared + [rng.getrandbits(17) for _ in range(16)], block_size=16)[1]
               for _ in range(2**18)]
    assert len(set(firsts)) == len(firsts) and len(set(seconds)) == len(seconds)
    assert not set(firsts) & set(seconds)


@given(st.lists(st.integers(0, 2**32 - 1), min_size=16, max_size=64), st.data())
def test_one_token_changed_changes_its_block_and_every_later_one(tokens: list[int], data) -> None:
    i = data.draw(st.integers(0, len(tokens) - 1))
    other = list(tokens)
    other[i] = data.draw(st.integers(0, 2**32 - 1).filter(lambda t: t != tokens[i]))
    a, b = block_hashes(tokens, block_size=16), block_hashes(other, block_size=16)
    k = i // 16
    assert a[:k] == b[:k]
    assert all(x != y for x, y in zip(a[k:], b[k:], strict=True))


def test_request_hashes_with_a_salt_follow_the_definition() -> None:
    # The salt is an extra key of block 0 only, the LoRA name of every block (vLLM's per-block lists).
    tokens = list(range(48))
    root = xxhash.xxh3_64_intdigest(b"kvr-root-block", seed=0x6B7672)
    h0 = xxhash.xxh3_64_intdigest(struct.pack("<16I", *tokens[:16]) + extra_key_bytes(["l", "s"]), seed=root)
    h1 = xxhash.xxh3_64_intdigest(struct.pack("<16I", *tokens[16:32]) + extra_key_bytes(["l"]), seed=h0)
    h2 = xxhash.xxh3_64_intdigest(struct.pack("<16I", *tokens[32:48]) + extra_key_bytes(["l"]), seed=h1)
    assert request_block_hashes(tokens, block_size=16, lora_name="l", cache_salt="s") == [h0, h1, h2]


def test_root_parent_hash_is_pinned() -> None:
    assert ROOT_PARENT_HASH == GOLDEN_ROOT


def test_golden_vectors_for_tokens_0_to_39() -> None:
    # 40 tokens at block size 16 = two full blocks; the 8 trailing tokens get no hash.
    assert block_hashes(list(range(40)), block_size=16) == GOLDEN_0_40


def test_same_value_in_a_fresh_process_with_another_hash_seed() -> None:
    code = "from core.own_block_hash import block_hashes; print(block_hashes(list(range(40)), block_size=16))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "987", "PATH": ""},
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
    assert len(lora) == 2 and all(a != b for a, b in zip(plain, lora, strict=True))
    assert block_hashes(tokens, block_size=16, extra_keys=["sql-lora"]) == lora


def test_bad_tokens_and_block_size_raise_value_error() -> None:
    with pytest.raises(ValueError):
        block_hashes([-1] * 16, block_size=16)
    with pytest.raises(ValueError):
        block_hashes([2**32] * 16, block_size=16)
    with pytest.raises(ValueError):
        block_hashes([1] * 16, block_size=0)


@pytest.mark.parametrize("bad", [-1, 2**32, "7", None])
def test_a_bad_token_counts_only_inside_a_full_block(bad) -> None:
    # Only full blocks are hashed: a bad id in the trailing partial block is never looked at
    # (whatever the packing path), one in a full block is a ValueError.
    tokens = list(range(40))
    assert block_hashes([*tokens[:32], bad, 5], block_size=16) == block_hashes(tokens[:32], block_size=16)
    assert block_hashes([*tokens[:32], bad], block_size=16, extra_keys=["x"]) == block_hashes(
        tokens[:32], block_size=16, extra_keys=["x"])
    with pytest.raises(ValueError):
        block_hashes([*tokens[:20], bad, *tokens[21:]], block_size=16)


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
