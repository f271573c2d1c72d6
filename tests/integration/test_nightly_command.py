"""`xenpv nightly` end to end on a small suite of its own and a real benchmark: it records the night (commit,
versions, host), runs the suite on xdist workers with one rerun of failures, runs `xenpv bench evtchn
--json`, and stores the night in the history."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from xenpv.harness.cli import main
from xenpv.harness.nightly.store import Store

INNER = '''
from pathlib import Path

def test_flaky():
    tries = Path({count!r})
    n = int(tries.read_text()) if tries.exists() else 0
    tries.write_text(str(n + 1))
    assert n > 0, "the first try fails"

def test_broken(artifacts):
    assert False, "broken"

def test_fine():
    pass
'''


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_night_is_run_recorded_and_stored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = tmp_path / "suite" / "test_inner.py"
    suite.parent.mkdir()
    suite.write_text(INNER.format(count=str(tmp_path / "count")))
    out, db = tmp_path / "nightly-1", f"sqlite:///{tmp_path / 'history.sqlite'}"
    status = main(["nightly", "--out", str(out), "--db", db, "--bench", "evtchn", "-n", "2", "--", str(suite)])
    printed = capsys.readouterr().out
    assert status == 1, printed  # test_broken failed
    assert "night nightly-1: 1 failed, 1 flaky, 1 passed; " in printed

    meta = json.loads((out / "night.json").read_text())
    assert len(meta["commit"].removesuffix("+dirty")) == 40 and meta["host"] and meta["status"] == 1
    versions = meta["versions"]
    assert versions["python"] and versions["kernel"]
    assert versions["xenpv version"][0].startswith("xenpv-harness ")
    assert versions["packages"]["SQLAlchemy"] and versions["packages"]["pytest-rerunfailures"]

    with Store.open(db) as store:
        (night,) = store.nights_since(datetime(2000, 1, 1, tzinfo=timezone.utc))
    got = {r.test.rpartition("::")[2]: r for r in night.results}
    assert {k: (r.outcome, r.attempts) for k, r in got.items()} == {
        "test_flaky": ("flaky", 2), "test_broken": ("failed", 2), "test_fine": ("passed", 1)}
    assert Path(got["test_broken"].artifacts).is_relative_to(out / "failures")
    figures = {f.figure: f for f in night.figures}
    rtt = figures["event channel round trip (guest->back-end->guest), median"]
    assert (rtt.benchmark, rtt.unit) == ("evtchn", "us") and rtt.value > 0
    assert json.loads((out / "bench-evtchn.json").read_text())["figures"]


def test_an_unknown_benchmark_is_refused_before_anything_runs(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nightly", "--out", str(tmp_path / "n"), "--bench", "nosuch", "--", "nothing"]) == 2
    assert "--bench nosuch: no such benchmark" in capsys.readouterr().err
    assert not (tmp_path / "n" / "night.json").exists()
