"""Fixtures shared by the worker tests."""

from tests.fakes.raw_router import router  # noqa: F401 (a pytest fixture: a bare ROUTER the worker talks to)
