"""`xenpv triage`: dumps found under directories grouped by bucket, one row each, with count, first and last
seen and an example that can be replayed; findings that are no STOP group the same way; a dump this xenpv
cannot read is named, not fatal. No guest is booted (--repro is exercised by the integration tests)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenpv.base.runrecord import Schedule, new_record
from xenpv.harness.cli import main
from xenpv.harness.crashes import triage
from xenpv.harness.replay import write_finding
from xenpv.stack.kernel import BugCheck, KeBugCheckEx
from xenpv.stack.kernel.bugcheck import CrashDump
from xenpv.stack.kernel.irql import Processor, set_current_processor


def make_dump(path: Path, code: int, module: str, written: str, *, with_record: bool = True) -> CrashDump:
    previous = set_current_processor(Processor())
    try:
        try:
            KeBugCheckEx(code, 1, 2, module=module, function="NightlyScenario")
        except BugCheck as stop:
            record = new_record("default", "/g.yaml", "name: default\n", 1, schedule=Schedule()).to_dict()
            dump = CrashDump.from_bugcheck(stop, record=record if with_record else None)
    finally:
        set_current_processor(previous)
    dump.written = written
    dump.save(path)
    return dump


@pytest.fixture
def nightly(tmp_path: Path) -> Path:
    """Artifacts of a nightly with several failing scenarios, in the per-test directories pytest keeps."""
    root = tmp_path / "nightly"
    make_dump(root / "s1" / "test_a" / "default" / "crash-000000e2.json", 0xE2, "xenbus.sys", "2026-01-02T03:00:00Z",
              with_record=False)
    make_dump(root / "s1" / "test_b" / "default" / "crash-000000e2.json", 0xE2, "xenbus.sys", "2026-01-03T03:00:00Z")
    make_dump(root / "s2" / "test_a" / "default" / "crash-000000e2.json", 0xE2, "xenbus.sys", "2026-01-01T03:00:00Z")
    make_dump(root / "s2" / "test_c" / "default" / "crash-000000d1.json", 0xD1, "xennet.sys", "2026-01-02T04:00:00Z")
    write_finding(root / "s2" / "test_d" / "default", "hang", "HANG_vbd", "action 3 (console: vbd read 0 0 1) did "
                  "not come back", None)
    bad = root / "s3" / "crash-0000dead.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"format": 99}))
    (root / "s3" / "notes.json").write_text("{}")  # not a dump's name: not looked at
    return root


def test_one_row_per_bucket_with_count_first_and_last_seen_and_a_replayable_example(nightly: Path) -> None:
    buckets, errors = triage([nightly])
    assert [(b.bucket, len(b.dumps)) for b in buckets] == [("0xE2_xenbus!NightlyScenario", 3),
                                                          ("0xD1_xennet!NightlyScenario+irql-passive", 1),
                                                          ("HANG_vbd", 1)]
    e2 = buckets[0]
    assert e2.first.path.parts[-4:-2] == ("s2", "test_a") and e2.last.path.parts[-4:-2] == ("s1", "test_b")
    assert e2.example.record is not None and e2.example.path == e2.last.path
    assert [b.kind for b in buckets] == ["stop", "stop", "hang"]
    assert len(errors) == 1 and "crash dump format 99 is not one this xenpv reads" in errors[0]


def test_the_command_prints_a_markdown_table_and_writes_json(nightly: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "triage.json"
    assert main(["triage", str(nightly / "s1"), str(nightly / "s2"), "--json", str(out_json)]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    assert len(table) == 3
    assert table[0].startswith("| `0xE2_xenbus!NightlyScenario` | 3 | 2026-01-01 03:00:00 | 2026-01-03 03:00:00 |")
    data = json.loads(out_json.read_text())
    assert [b["count"] for b in data["buckets"]] == [3, 1, 1] and data["unreadable"] == []
    assert data["buckets"][0]["reproduces"] == "-"


def test_a_path_that_does_not_exist_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["triage", str(tmp_path / "missing")]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
