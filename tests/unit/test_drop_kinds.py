"""Drop kinds are a closed set (model.DROP_KINDS): every kind the code can count is in it,
each is a metric series from start-up, and a name outside it is refused, never a new label."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from imds_tracer.config import Config
from imds_tracer.model import DROP_KINDS, LOST_STAGES
from imds_tracer.pipeline import Pipeline
from imds_tracer.sinks.metrics import MetricsSink

PACKAGE = Path(__file__).resolve().parents[2] / "imds_tracer"


def kinds_in_code() -> dict:
    """Every string literal given as the kind to drop(...), _drop(...) or Dropped(...)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            first = node.args[0]
            if name in ("drop", "_drop", "Dropped") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                found.setdefault(first.value, f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_every_kind_the_code_counts_is_declared():
    found = kinds_in_code()
    assert {"log_write", "flow_table_full", "stream_gap", "head_truncated"} <= set(found)
    undeclared = {kind: where for kind, where in found.items() if kind not in DROP_KINDS}
    assert not undeclared, f"drop kinds missing from model.DROP_KINDS: {undeclared}"


def test_every_kind_is_a_metric_series_from_the_start():
    metrics = MetricsSink(backend="replay", cloud=None)
    sample = metrics.registry.get_sample_value
    for kind in DROP_KINDS:
        if kind in LOST_STAGES:
            value = sample("imds_tracer_lost_events_total", {"stage": LOST_STAGES[kind]})
        else:
            value = sample("imds_tracer_dropped_total", {"kind": kind})
        assert value == 0, kind
    metrics.count_drop("stale_fd", 2)
    assert sample("imds_tracer_dropped_total", {"kind": "stale_fd"}) == 2


def test_an_unknown_kind_is_refused_not_counted():
    pipeline = Pipeline(Config(cloud="none"), [MetricsSink(backend="replay", cloud=None)])
    with pytest.raises(ValueError, match="bogus"):
        pipeline.drop("bogus", 1)
    assert "bogus" not in pipeline.drop_totals
