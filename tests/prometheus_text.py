"""Reading Prometheus text back as Prometheus would (prometheus_client's own parser)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric_value(text: str | bytes, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels`` (the first such), or None."""
    if isinstance(text, bytes):
        text = text.decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def metric_samples(text: str | bytes, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name``: (labels, value)."""
    if isinstance(text, bytes):
        text = text.decode()
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
