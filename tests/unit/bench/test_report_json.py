"""`xenpv bench --json`: every figure's target is machine-readable (a comparison and a value), so the
nightly history can say whether a night met it without reading prose."""
from __future__ import annotations

import json

from xenpv.harness.bench import BenchReport
from xenpv.harness.bench.targets import parse_target


def test_targets_in_json_are_comparisons_and_values() -> None:
    r = BenchReport("t")
    r.add("boot", 612.0, "ms", "<= 450 ms")
    a = r.add("rate", 10.0, "frames/s")
    b = r.add("baseline", 40.0, "frames/s")
    r.ratio("ratio", a, b).target = ">= 0.25"
    r.add("reads", 25000.0, "ops/s", ">= 20,000")
    r.add("odd", 1.0, "ms", "< 1.5 s")  # another unit: kept as text, never compared
    figures = json.loads(json.dumps(r.to_json()))["figures"]
    assert figures["boot"]["target"] == {"op": "<=", "value": 450.0}
    assert figures["ratio"] == {"value": 0.25, "unit": "x", "target": {"op": ">=", "value": 0.25}}
    assert figures["reads"]["target"] == {"op": ">=", "value": 20000.0}
    assert figures["odd"]["target"] == "< 1.5 s"
    assert "target" not in figures["rate"]
    # What the nightly reads back is the same comparison.
    assert parse_target(figures["ratio"]["target"], "x", "here").met(0.25) is True
    assert parse_target(figures["boot"]["target"], "ms", "here").met(612.0) is False
