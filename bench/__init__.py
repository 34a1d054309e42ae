"""kvr benchmark suites (``kvr bench SUITE``): overhead, basic, scale, stale, peer.

Benchmarks are not tests: they measure, on this machine, and report ratios against baselines
measured in the same run. Each suite returns a :class:`bench.results.SuiteResult` that is written
as JSON, a markdown table and plots (``bench/results.py``).
"""
