"""Fixtures shared by the router tests."""

from __future__ import annotations

import pytest
import zmq


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()
