"""The one percentile definition, and the two sample distributions a fold keeps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from core.quantiles import ExactSamples, SketchSamples, new_samples, percentile, samples_from_json


@pytest.mark.parametrize("seed", range(5))
def test_percentile_is_numpys_linear_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    values = rng.lognormal(-2.0, 1.5, n)
    ordered = sorted(values.tolist())
    for q in (0, 1, 10, 25, 50, 75, 90, 99, 99.9, 100, float(rng.uniform(0, 100))):
        assert percentile(ordered, q) == pytest.approx(float(np.percentile(values, q, method="linear")), rel=1e-12)


def test_percentile_interpolates_between_ranks():
    # rank (4 - 1) * 0.5 = 1.5: halfway between the 2nd and 3rd values (nearest rank would say 2.0).
    assert percentile([1.0, 2.0, 4.0, 8.0], 50) == 3.0
    assert percentile([1.0, 2.0, 4.0, 8.0], 100) == 8.0
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def _clipped_lognormal(seed: int, n: int) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).lognormal(-2.0, 1.0, n), 1e-3, 20.0)


@pytest.mark.parametrize("q", [1, 25, 50, 90, 99, 99.9])
def test_sketch_quantiles_are_within_the_relative_accuracy(q):
    x = _clipped_lognormal(1, 50_000)
    s = SketchSamples(relative_accuracy=0.01)
    for v in x.tolist():
        s.add(v)
    ordered = np.sort(x)
    rank = (len(x) - 1) * q / 100
    lo, hi = ordered[math.floor(rank)], ordered[math.ceil(rank)]
    # The sketch's value is within 1 % of the order statistic at the rank rounded down;
    # numpy's interpolated percentile lies between that one and the next.
    assert abs(s.quantile(q) - lo) <= 0.01 * lo
    assert abs(s.quantile(q) - np.percentile(x, q)) <= 0.01 * np.percentile(x, q) + (hi - lo)


def test_sketch_counts_sums_and_extremes_are_exact():
    s = SketchSamples(relative_accuracy=0.01)
    values = [0.0, 0.0, -0.25, 0.003, 0.5, 12.0, 0.5]
    for v in values:
        s.add(v)
    assert len(s) == 7 and s.total() == sum(values) and s.mean() == sum(values) / 7
    assert s.min() == -0.25 and s.max() == 12.0
    assert s.quantile(0) == -0.25 and s.quantile(100) == 12.0  # clamped to the exact extremes
    # rank 2.4: 0.4 of the way from the second zero to 0.003, as numpy interpolates
    assert math.isclose(s.quantile(40), 0.4 * 0.003, rel_tol=0.01)
    assert s.quantile(100 / 6) == 0.0  # rank 1.0: exactly the first zero
    xs, counts = s.weighted()
    assert counts == [1, 2, 1, 2, 1] and sum(counts) == len(s)
    assert xs == sorted(xs) and xs[1] == 0.0
    for got, want in zip(xs, [-0.25, 0.0, 0.003, 0.5, 12.0], strict=True):
        assert abs(got - want) <= 0.01 * abs(want)


def test_sketch_quantiles_interpolate_between_order_statistics_like_percentile():
    # Three values: p99 lies just below the largest (numpy: 0.3148), never at the median as the
    # sketch's own lower-rank answer would put it (the dashboard showed p99 < mean).
    s = SketchSamples(relative_accuracy=0.01)
    values = [0.099, 0.06, 0.32]
    for v in values:
        s.add(v)
    for q in (10, 50, 90, 99):
        assert math.isclose(s.quantile(q), float(np.percentile(values, q)), rel_tol=0.01), q


def test_sketch_json_round_trip_and_merge():
    a, b, whole = (SketchSamples(relative_accuracy=0.02) for _ in range(3))
    x = _clipped_lognormal(2, 3000).tolist() + [0.0, -1.5]
    for i, v in enumerate(x):
        (a if i % 3 else b).add(v)
        whole.add(v)
    again = samples_from_json(json.loads(json.dumps(a.to_json())))
    assert isinstance(again, SketchSamples) and again.to_json() == a.to_json()
    again.merge(b)
    assert len(again) == len(whole) and again.weighted() == whole.weighted()
    assert [again.quantile(q) for q in (1, 50, 99)] == [whole.quantile(q) for q in (1, 50, 99)]
    with pytest.raises(TypeError):
        again.merge(SketchSamples(relative_accuracy=0.01))
    with pytest.raises(TypeError):
        again.merge(ExactSamples([1.0]))


def test_sketch_memory_stays_flat():
    s = SketchSamples(relative_accuracy=0.01)
    x = _clipped_lognormal(3, 40_000).tolist()
    for v in x[:20_000]:
        s.add(v)
    half = s.stored()
    for v in x[20_000:]:
        s.add(v)
    assert s.stored() == half <= 2 * 2048 and len(s) == 40_000


def test_exact_samples_are_a_list_with_the_same_answers():
    e = new_samples(None)
    for v in (0.3, 0.1, 0.2):
        e.add(v)
    assert e == [0.3, 0.1, 0.2] and e.to_json() == [0.3, 0.1, 0.2] and e.stored() == 3
    assert e.quantile(50) == 0.2 and e.max() == 0.3 and e.min() == 0.1
    assert e.weighted() == ([0.1, 0.2, 0.3], [1, 1, 1])
    assert isinstance(samples_from_json([1.0]), ExactSamples)
    with pytest.raises(ValueError):
        samples_from_json({"sketch": "other"})
