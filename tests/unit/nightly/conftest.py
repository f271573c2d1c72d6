"""Synthetic nights for the nightly store and report tests: a night directory as `xenpv nightly` writes it
(night.json, a JUnit XML in pytest's xunit1 shape with one <testcase> per attempt, bench-NAME.json as
`xenpv bench NAME --json` prints), so the tests go through the same ingest code as a real night."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest


@dataclass
class Attempt:
    outcome: str = "passed"  # passed, failed, error, skipped
    message: str = ""
    time: float = 0.5
    properties: dict[str, str] = field(default_factory=dict)


def write_night(directory: Path, started: datetime, tests: dict[str, list[Attempt]],
                benches: dict[str, dict[str, object]], commit: str = "0" * 40, status: int = 0) -> Path:
    directory.mkdir(parents=True)
    (directory / "night.json").write_text(json.dumps({
        "label": directory.name, "started_at": started.isoformat(), "commit": commit, "host": "ci-1.example",
        "versions": {"python": "3.11.2", "kernel": "6.1.0-18-amd64"}, "status": status}))
    suite = ET.Element("testsuite", name="pytest")
    for name, attempts in tests.items():
        module, _, func = name.rpartition("::")
        for i, a in enumerate(attempts):
            case = ET.SubElement(suite, "testcase", classname=module, name=func, time=f"{a.time:.3f}")
            properties = dict(a.properties)
            if a.outcome in ("failed", "error"):
                properties["xenpv_failure"] = a.message  # as harness.plugin records on every failed attempt
            if properties:
                props = ET.SubElement(case, "properties")
                for k, v in properties.items():
                    ET.SubElement(props, "property", name=k, value=v)
            # As pytest-rerunfailures has it: an attempt that was rerun is a bare <testcase>.
            if a.outcome != "passed" and i == len(attempts) - 1:
                tag = {"failed": "failure", "error": "error", "skipped": "skipped"}[a.outcome]
                el = ET.SubElement(case, tag, message=a.message)
                el.text = f"Traceback ...\n{a.message}"
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(directory / "junit.xml", encoding="utf-8", xml_declaration=True)
    for bench, figures in benches.items():
        (directory / f"bench-{bench}.json").write_text(json.dumps({"benchmark": bench, "figures": figures,
                                                                   "notes": []}))
    return directory


P = Attempt()
BUCKET = "0x7E_XENBUS_store.c_StoreFreePayload"


def three_nights(root: Path, now: datetime | None = None) -> list[Path]:
    """Night 1 and 2 pass what night 3 breaks (one regression); test_flaky fails once in night 2 and passes
    its rerun (one flaky); test_fixed fails in nights 1 and 2 and passes in night 3 (one fixed). Around them:
    a test failing the same way every night (numbers in its message differ), one failing differently, a STOP
    bucket in nights 2 and 3, a benchmark figure 27% worse than its median, one missing its target."""
    now = now or datetime.now(timezone.utc)
    m = "tests.integration.test_ring"
    fail = lambda msg, **props: Attempt("failed", msg, properties=props)  # noqa: E731
    crash = fail("xenpv: STOP 0x0000007E", xenpv_bucket=BUCKET, xenpv_crash_dump="/a/crash-0000007e.json",
                 xenpv_artifacts="/a/test_crash")
    nights = [
        ({f"{m}::test_stable": [P], f"{m}::test_regress": [P], f"{m}::test_flaky": [P],
          f"{m}::test_fixed": [fail("AssertionError: ring full"), fail("AssertionError: ring full")],
          f"{m}::test_same": [fail("TimeoutError: pid 1234 gave no answer in 30 s")] * 2,
          f"{m}::test_diff": [P], f"{m}::test_crash": [P], f"{m}::test_skip": [Attempt("skipped", "no vhost")]},
         {"rtt": 100.0, "iops": 5000.0, "ratio": 0.60, "boot": 900.0}),
        ({f"{m}::test_stable": [P], f"{m}::test_regress": [P],
          f"{m}::test_flaky": [fail("AssertionError: evtchn 7 not pending"), P],
          f"{m}::test_fixed": [fail("AssertionError: ring full"), fail("AssertionError: ring full")],
          f"{m}::test_same": [fail("TimeoutError: pid 5678 gave no answer in 30 s")] * 2,
          f"{m}::test_diff": [fail("KeyError: 'backend'")] * 2, f"{m}::test_crash": [crash, crash],
          f"{m}::test_skip": [Attempt("skipped", "no vhost")]},
         {"rtt": 104.0, "iops": 5100.0, "ratio": 0.58, "boot": 910.0}),
        ({f"{m}::test_stable": [P], f"{m}::test_regress": [fail("AssertionError: grant 0x7f0012345678 leaked")] * 2,
          f"{m}::test_flaky": [P], f"{m}::test_fixed": [P],
          f"{m}::test_same": [fail("TimeoutError: pid 91011 gave no answer in 30 s")] * 2,
          f"{m}::test_diff": [fail("ValueError: state 9")] * 2, f"{m}::test_crash": [crash, crash],
          f"{m}::test_skip": [Attempt("skipped", "no vhost")]},
         {"rtt": 130.0, "iops": 6000.0, "ratio": 0.40, "boot": 905.0}),
    ]
    out = []
    for i, (tests, f) in enumerate(nights):
        benches = {
            "resume": {"round trip": {"value": f["rtt"], "unit": "ms", "target": {"op": "<", "value": 150}},
                       "boot": {"value": f["boot"], "unit": "ms", "target": "< 1.5 s"}},
            "blk": {"4 KiB read QD32": {"value": f["iops"], "unit": "IOPS", "target": ">= 5,000"},
                    "ratio": {"value": f["ratio"], "unit": "x", "target": ">= 0.5"}},
        }
        out.append(write_night(root / f"nightly-{i + 1}", now - timedelta(days=3 - i, hours=1), tests, benches,
                               commit=f"{i + 1}" * 40, status=int(i > 0)))
    return out


@pytest.fixture
def synthetic_nights(tmp_path: Path) -> list[Path]:
    return three_nights(tmp_path / "nights")


@pytest.fixture
def nightkit():
    """The writers above for a test that makes a night of its own."""
    from types import SimpleNamespace
    return SimpleNamespace(Attempt=Attempt, write_night=write_night, three_nights=three_nights)
