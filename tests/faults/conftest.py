"""The fault suite's shared state: one result row per case; ``KVR_FAULTS_OUT=dir`` writes the table."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def fault_rows():
    rows: list = []
    yield rows
    out = os.environ.get("KVR_FAULTS_OUT")
    if out and rows:
        from bench.faults import write_table

        write_table(rows, out, command=f"KVR_FAULTS_OUT={out} python -m pytest -m faults tests/faults")
