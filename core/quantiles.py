"""Percentiles, and the two ways a metrics fold keeps a latency distribution.

**The percentile definition** (the project's only one): linear interpolation
between the closest ranks of the sorted samples, numpy's default
(``numpy.percentile(..., method="linear")``): rank ``(n - 1) * q / 100``.

A fold keeps each distribution (TTFT, TPOT, end-to-end, ...) as one of:

* :class:`ExactSamples`: every value (a ``list``). Exact percentiles, memory
  grows with the run. The simulator's runs are finite and its figures exact.
* :class:`SketchSamples`: a DDSketch (DataDog's ``ddsketch``): fixed memory,
  every quantile within ``relative_accuracy`` of a true order statistic,
  mergeable, exact count / sum / min / max. The live monitor's runs have no end.

Both answer the same questions: ``len()`` (exact count), ``stored()`` (values
or bins held in memory), ``total()``,
``mean()``, ``min()``, ``max()``, ``quantile(q)``, ``weighted()`` (sorted
values and their counts: what histograms and CDFs are drawn from), ``add()``,
``merge()`` and JSON (``to_json`` / :func:`samples_from_json`).

Why DDSketch and not HdrHistogram: the ``ddsketch`` package is pure Python
(one small dependency, ``six``; installs from a universal wheel), takes float
values of any magnitude with a relative-error guarantee, and merges. The
``hdrhistogram`` package records integers over a preset range (latencies would
need a unit and a ceiling chosen up front), is a C extension, and requires
``pbr`` and ``setuptools`` at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import CollapsingLowestDenseStore

#: The monitor's default: every reported quantile within 1 % of a true order statistic.
DEFAULT_RELATIVE_ACCURACY = 0.01
#: Bins per sign of a sketch. At 1 % accuracy 2048 bins span a ratio of ~1e17
#: between the smallest and largest value kept exactly (1 ns .. 3 years); beyond
#: that the *lowest* bins collapse (their accuracy, never the count, is lost).
SKETCH_BIN_LIMIT = 2048


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted values; NaN if empty.

    Linear interpolation between the closest ranks (numpy's default).
    """
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = (n - 1) * q / 100.0
    lo = int(math.floor(rank))
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


class ExactSamples(list[float]):
    """Every value, in arrival order (a plain ``list`` to code that wants one)."""

    def add(self, value: float) -> None:
        self.append(value)

    def merge(self, other: Samples) -> None:
        if not isinstance(other, ExactSamples):
            raise TypeError("an exact fold merges only exact samples")
        self.extend(other)

    def total(self) -> float:
        # Summed in sorted order: the order the fold's figures have always used
        # (a float sum depends on order, and the simulator's report is compared byte for byte).
        return sum(sorted(self)) if self else 0.0

    def mean(self) -> float:
        return self.total() / len(self) if self else math.nan

    def min(self) -> float:
        return min(self) if self else math.nan

    def max(self) -> float:
        return max(self) if self else math.nan

    def quantile(self, q: float) -> float:
        return percentile(sorted(self), q)

    def weighted(self) -> tuple[list[float], list[int]]:
        values = sorted(self)
        return values, [1] * len(values)

    def stored(self) -> int:
        """Values held in memory (grows with every ``add``)."""
        return len(self)

    def to_json(self) -> list[float]:
        return list(self)


class SketchSamples:
    """A bounded distribution: DDSketch bins with a relative-error guarantee.

    Memory is at most :data:`SKETCH_BIN_LIMIT` counters per sign whatever the
    number of values. ``quantile(q)`` interpolates linearly between the sketch's
    two order statistics around rank ``q / 100 * (n - 1)``, as :func:`percentile`
    does between the true ones: each is within ``relative_accuracy`` of the true
    value, so the answer is within ``relative_accuracy`` of :func:`percentile`.
    Count, sum, min and max are exact (and so are the 0th and 100th percentiles).
    """

    def __init__(self, *, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        if not 0 < relative_accuracy < 1:
            raise ValueError("relative_accuracy must be in (0, 1)")
        self.relative_accuracy = relative_accuracy
        self._mapping = LogarithmicMapping(relative_accuracy)
        self._positive = CollapsingLowestDenseStore(SKETCH_BIN_LIMIT)
        self._negative = CollapsingLowestDenseStore(SKETCH_BIN_LIMIT)
        self._sketch = BaseDDSketch(
            mapping=self._mapping, store=self._positive, negative_store=self._negative, zero_count=0.0
        )
        self._count = 0
        self._total = 0.0
        self._min = math.inf
        self._max = -math.inf

    # ---- inputs
    def add(self, value: float) -> None:
        self._sketch.add(value)
        self._count += 1
        self._total += value
        if value < self._min:
            self._min = value
        if value > self._max:
            self._max = value

    def merge(self, other: Samples) -> None:
        if not isinstance(other, SketchSamples) or other.relative_accuracy != self.relative_accuracy:
            raise TypeError("a sketch merges only sketches of the same relative accuracy")
        self._sketch.merge(other._sketch)
        self._count += other._count
        self._total += other._total
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    # ---- answers
    def __len__(self) -> int:
        return self._count

    def total(self) -> float:
        return self._total

    def mean(self) -> float:
        return self._total / self._count if self._count else math.nan

    def min(self) -> float:
        return self._min if self._count else math.nan

    def max(self) -> float:
        return self._max if self._count else math.nan

    def quantile(self, q: float) -> float:
        """The linear-interpolated percentile (:func:`percentile`'s definition) between the
        sketch's two order statistics around rank ``q / 100 * (n - 1)``: each within
        ``relative_accuracy`` of the true one, so the answer is too. (ddsketch's own quantile
        takes the lower order statistic: with three values its p99 would be the median.)"""
        if not self._count:
            return math.nan
        if q <= 0:
            return self._min
        if q >= 100:
            return self._max
        rank = q / 100.0 * (self._count - 1)
        lo = math.floor(rank)
        v_lo = self._order_statistic(lo)
        if rank == lo:
            return v_lo
        v_hi = self._order_statistic(lo + 1)
        return v_lo + (rank - lo) * (v_hi - v_lo)

    def _order_statistic(self, k: int) -> float:
        """The sketch's value of the ``k``-th smallest value (0-based), clamped to the exact extremes."""
        if k <= 0:
            return self._min
        if k >= self._count - 1:
            return self._max
        # ddsketch answers the value at rank floor(q * (n - 1)); half a rank above k keeps
        # floating-point rounding from landing on k - 1.
        value = self._sketch.get_quantile_value(min(1.0, (k + 0.5) / (self._count - 1)))
        if value is None:  # ddsketch's answer for an empty sketch; _count > 0 rules it out
            return math.nan
        return min(self._max, max(self._min, float(value)))

    def weighted(self) -> tuple[list[float], list[int]]:
        """Each non-empty bin's representative value and count, ascending."""
        values: list[float] = []
        counts: list[int] = []
        for key, n in reversed(_bins(self._negative)):
            values.append(-self._mapping.value(key))
            counts.append(n)
        zeros = self._count - int(self._positive.count) - int(self._negative.count)
        if zeros:
            values.append(0.0)
            counts.append(zeros)
        for key, n in _bins(self._positive):
            values.append(self._mapping.value(key))
            counts.append(n)
        return values, counts

    def stored(self) -> int:
        """Bin counters held in memory (at most ``2 * SKETCH_BIN_LIMIT`` whatever the count)."""
        return len(self._positive.bins) + len(self._negative.bins)

    # ---- JSON
    def to_json(self) -> dict[str, Any]:
        return {
            "sketch": "ddsketch",
            "relative_accuracy": self.relative_accuracy,
            "count": self._count,
            "total": self._total,
            "min": self._min if self._count else None,
            "max": self._max if self._count else None,
            "positive": _bins_json(self._positive),
            "negative": _bins_json(self._negative),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SketchSamples:
        s = cls(relative_accuracy=d["relative_accuracy"])
        for store, (offset, counts) in ((s._positive, d["positive"]), (s._negative, d["negative"])):
            for i, n in enumerate(counts):
                if n:
                    store.add(offset + i, n)
        zeros = d["count"] - int(s._positive.count) - int(s._negative.count)
        if zeros < 0:
            raise ValueError("sketch count is less than its bins' counts")
        s._sketch = BaseDDSketch(mapping=s._mapping, store=s._positive, negative_store=s._negative, zero_count=zeros)
        s._count = d["count"]
        s._total = d["total"]
        s._min = math.inf if d["min"] is None else d["min"]
        s._max = -math.inf if d["max"] is None else d["max"]
        return s


def _bins(store: CollapsingLowestDenseStore) -> list[tuple[int, int]]:
    """(key, count) of the store's non-empty bins, ascending keys."""
    return [(store.offset + i, int(n)) for i, n in enumerate(store.bins) if n]


def _bins_json(store: CollapsingLowestDenseStore) -> list[Any]:
    """``[first key, [counts...]]`` trimmed to the non-empty range (``[0, []]`` when empty)."""
    if not store.count:
        return [0, []]
    lo = store.min_key - store.offset
    hi = store.max_key - store.offset
    return [store.min_key, [int(n) for n in store.bins[lo : hi + 1]]]


Samples = ExactSamples | SketchSamples


def samples_from_json(value: Any) -> Samples:
    """Inverse of ``to_json``: a list is exact samples, an object a sketch."""
    if isinstance(value, list):
        return ExactSamples(value)
    if isinstance(value, dict) and value.get("sketch") == "ddsketch":
        return SketchSamples.from_json(value)
    raise ValueError(f"not a sample distribution: {type(value).__name__}")


def new_samples(relative_accuracy: float | None) -> Samples:
    """Exact samples (``None``) or a sketch of that relative accuracy."""
    return ExactSamples() if relative_accuracy is None else SketchSamples(relative_accuracy=relative_accuracy)
