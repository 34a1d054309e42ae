"""The KV block: the unit an engine caches, indexes and reports.

``DEFAULT_BLOCK_SIZE`` is vLLM's default ``--block-size`` on CUDA (tokens per KV block). Every
default in kvr that names a block size is this one; a fleet whose engines use another passes it
everywhere (``kvr router --block-size``; the router refuses workers that disagree).
"""

from __future__ import annotations

DEFAULT_BLOCK_SIZE = 16
