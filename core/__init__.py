"""Pure logic of kvr: no sockets, no Redis, no asyncio, no clock.

Everything here takes ``now``, an ``rng`` and a config and returns results,
durations and events. The live services and the simulator call the same objects.
"""
