"""The run record (base.runrecord): a versioned journal two processes append to, read back whole, embedded
in crash dumps; a record of a format this xenpv does not know is a clear error, never half-read."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from xenpv.base.runrecord import (CONSOLE, DOM0, FAULT, RUN_RECORD_FORMAT, RunJournal, RunRecord, RunRecordError,
                                  Schedule, broadcast, collect_versions, console_kind, new_record, read_journal)


def record(**changes: object) -> RunRecord:
    base = new_record("default", "/guests/default.yaml", "name: default\nseed: 7\n", 7,
                      schedule=Schedule("seeded", 7), labels={"made-by": "test"})
    return base if not changes else RunRecord(**{**base.__dict__, **changes})  # type: ignore[arg-type]


def _agent_appends(path: str, count: int) -> None:
    journal = RunJournal.attach(Path(path), "agent")
    for n in range(count):
        journal.event(CONSOLE, line=f"vbd read 0 {n} 1")
    journal.close()


def test_harness_and_agent_append_to_one_journal_and_it_reads_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "run-record.jsonl"
    harness = RunJournal.create(path, record())
    harness.event(DOM0, action="backend-kill", backend="blkback")
    # The agent is another process: its lines and the harness's never interleave within a line.
    agent = multiprocessing.get_context("spawn").Process(target=_agent_appends, args=(str(path), 50))
    agent.start()
    for n in range(50):
        harness.event("xenstore", op="write", path=f"backend/vbd/1/768/x{n}", value="1")
    agent.join(30)
    assert agent.exitcode == 0
    harness.event(FAULT, line="bugcheck 0xE2")
    harness.close()
    got = read_journal(path)
    assert got.seed == 7 and got.schedule == Schedule("seeded", 7) and got.labels == {"made-by": "test"}
    assert got.events[0].data == {"action": "backend-kill", "backend": "blkback"}
    assert got.events[-1].line == "bugcheck 0xE2" and got.events[-1].kind == FAULT
    agent_lines = [e.line for e in got.events if e.source == "agent"]
    assert agent_lines == [f"vbd read 0 {n} 1" for n in range(50)]
    assert len(got.events) == 102
    assert all(a.t <= b.t for a, b in zip(got.events, got.events[1:]))
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_record_round_trips_through_a_dump_dict(tmp_path: Path) -> None:
    journal = RunJournal.create(tmp_path / "r.jsonl", record())
    journal.event(CONSOLE, line="devices")
    journal.close()
    got = read_journal(tmp_path / "r.jsonl")
    again = RunRecord.from_dict(json.loads(json.dumps(got.to_dict())), "dump")
    assert again == got and again.format == RUN_RECORD_FORMAT


def test_a_record_of_an_unknown_format_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    data = record().to_dict()
    data["format"] = 99
    with pytest.raises(RunRecordError) as err:
        RunRecord.from_dict(data, "crash-000000d1.json: record")
    assert str(err.value).startswith("crash-000000d1.json: record: run record format 99 is not one this xenpv "
                                     "reads (1); a newer xenpv wrote it")
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({**data, "kind": "header", "events": None}) + "\n")
    with pytest.raises(RunRecordError, match=r"r.jsonl: run record format 99"):
        read_journal(path)


@pytest.mark.parametrize("change, message", [
    ({"seed": "7"}, "seed must be an integer"),
    ({"schedule": {"mode": "fifo"}}, "schedule mode 'fifo'"),
    ({"events": [{"t": 0, "kind": "console"}]}, "event 0: no 'source'"),
    ({"guest_yaml": None}, "guest_yaml must be a string"),
])
def test_a_malformed_record_names_what_is_wrong(change: dict[str, object], message: str) -> None:
    data = {**record().to_dict(), **change}
    with pytest.raises(RunRecordError, match=message):
        RunRecord.from_dict(data, "r")


def test_a_line_cut_short_by_a_killed_writer_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    RunJournal.create(path, record()).close()
    with open(path, "a") as f:
        f.write(json.dumps({"t": 1, "kind": "console", "source": "agent", "data": {"line": "pci"}}) + "\n")
        f.write('{"t": 2, "kind": "cons')
    assert [e.line for e in read_journal(path).events] == ["pci"]


def test_not_a_record_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"t": 1, "kind": "console"}\n')
    with pytest.raises(RunRecordError, match="first line of a run record must be its header"):
        read_journal(path)
    with pytest.raises(RunRecordError, match="cannot read the run record"):
        RunJournal.attach(tmp_path / "missing.jsonl", "agent")


def test_broadcast_reaches_every_open_journal_of_the_process_and_no_closed_one(tmp_path: Path) -> None:
    a = RunJournal.create(tmp_path / "a.jsonl", record())
    b = RunJournal.create(tmp_path / "b.jsonl", record())
    b.close()
    try:
        assert broadcast(DOM0, action="backend-restart", backend="netback") >= 1
    finally:
        a.close()
    assert [e.data["backend"] for e in read_journal(tmp_path / "a.jsonl").events] == ["netback"]
    assert read_journal(tmp_path / "b.jsonl").events == ()


def test_an_oversized_event_is_refused_not_split(tmp_path: Path) -> None:
    with RunJournal.create(tmp_path / "r.jsonl", record()) as journal:
        with pytest.raises(RunRecordError, match="over the limit"):
            journal.event("save", image="x" * 100_000)
    assert read_journal(tmp_path / "r.jsonl").events == ()


def test_fault_lines_and_schedules() -> None:
    assert console_kind("bugcheck 0xD1") == FAULT and console_kind("fault leak-ref STORE") == FAULT
    assert console_kind("vbd list") == CONSOLE and console_kind("") == CONSOLE
    assert Schedule.parse("seeded:0x10") == Schedule("seeded", 16) and Schedule.parse("os") == Schedule()
    assert Schedule("seeded", 3).argument() == "seeded:3"
    for bad in ("seeded", "seeded:x", "os:1", "random"):
        with pytest.raises(RunRecordError):
            Schedule.parse(bad)


def test_versions_name_the_commit_python_and_qemu() -> None:
    versions = collect_versions("/bin/true")
    assert {"commit", "xenpv-harness", "python", "qemu", "qemu_binary", "pexpect"} <= set(versions)
    assert versions["qemu_binary"] == "/bin/true"
