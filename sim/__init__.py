"""Discrete-event simulator: the core engine, index and policies on a virtual clock."""
