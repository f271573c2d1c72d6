"""The morning report over three synthetic nights (tests/unit/nightly/conftest.py: one regression, one
flaky test, one fixed), ingested through the code `xenpv nightly` uses, each section checked; the HTML page
is rendered by headless Chromium."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from xenpv.harness.cli import main
from xenpv.harness.nightly import report
from xenpv.harness.nightly.ingest import ingest
from xenpv.harness.nightly.store import Store

M = "tests.integration.test_ring"
SINCE = datetime.now(timezone.utc) - timedelta(days=14)


@pytest.fixture
def store(tmp_path: Path, synthetic_nights: list[Path]):
    with Store.open(f"sqlite:///{tmp_path / 'history.sqlite'}") as s:
        for night in synthetic_nights:
            ingest(s, night)
        yield s


@pytest.fixture
def rep(store: Store) -> report.Report:
    return report.build(store.nights_since(SINCE), SINCE)


def test_new_failures_are_the_tests_that_passed_the_night_before(rep: report.Report) -> None:
    assert [(c.test, c.signature) for c in rep.regressions] == [
        (f"{M}::test_regress", "AssertionError: grant N leaked")]


def test_the_same_failure_with_other_numbers_is_still_the_same_way(rep: report.Report) -> None:
    same = {c.test: (c.signature, c.nights) for c in rep.same}
    assert same == {f"{M}::test_same": ("TimeoutError: pid N gave no answer in N s", 3),
                    f"{M}::test_crash": (f"STOP 0x7E_XENBUS_store.c_StoreFreePayload", 2)}
    assert [(c.test, c.signature, c.before) for c in rep.different] == [
        (f"{M}::test_diff", "ValueError: state N", "KeyError: 'backend'")]


def test_fixed_flaky_and_never_passed(rep: report.Report) -> None:
    assert rep.fixed == [f"{M}::test_fixed"]
    assert [(f.test, f.passed_first, f.ran, f.flaky_nights, f.signature) for f in rep.flaky] == [
        (f"{M}::test_flaky", 2, 3, 1, "AssertionError: evtchn N not pending")]
    # test_fixed passed in night 3 and test_skip never ran: neither is "never passed".
    assert [(c.test, c.nights) for c in rep.never_passed] == [(f"{M}::test_same", 3)]


def test_crash_buckets_count_and_first_and_last_seen(rep: report.Report, synthetic_nights: list[Path]) -> None:
    (bucket,) = rep.buckets
    assert (bucket.bucket, bucket.count, bucket.tests) == ("0x7E_XENBUS_store.c_StoreFreePayload", 2,
                                                          [f"{M}::test_crash"])
    assert bucket.first_seen == rep.nights[1].started_at and bucket.last_seen == rep.nights[2].started_at


def test_benchmark_regressions_against_the_median_and_missed_targets(rep: report.Report) -> None:
    found = {(b.benchmark, b.figure): b for b in rep.bench_regressions}
    # round trip: 130 ms against the median 102 of 100 and 104, +27%, and lower is better (its target is
    # "<"); ratio: 0.40 against 0.59, -32%, higher is better (">="). IOPS rose by 19% (better, its target
    # is ">="), boot moved 0%: neither is a regression.
    assert sorted(found) == [("blk", "ratio"), ("resume", "round trip")]
    rtt, ratio = found["resume", "round trip"], found["blk", "ratio"]
    assert (rtt.value, rtt.baseline, rtt.nights, rtt.direction) == (130.0, 102.0, 2, "worse")
    assert rtt.change == pytest.approx(28 / 102)
    assert (ratio.baseline, ratio.direction) == (pytest.approx(0.59), "worse")
    # 0.40 misses ">= 0.5"; 130 ms meets "< 150"; "< 1.5 s" is in another unit than ms and is not compared.
    assert [(m.benchmark, m.figure, m.target) for m in rep.missed_targets] == [("blk", "ratio", ">= 0.5")]


def test_a_threshold_above_the_change_reports_no_regression(store: Store) -> None:
    rep = report.build(store.nights_since(SINCE), SINCE, threshold=0.40)
    assert rep.bench_regressions == []


def test_since_leaves_older_nights_out(store: Store) -> None:
    rep = report.build(store.nights_since(datetime.now(timezone.utc) - timedelta(days=2, hours=12)), SINCE)
    assert [n.label for n in rep.nights] == ["nightly-2", "nightly-3"]
    assert rep.fixed == [f"{M}::test_fixed"]
    assert [f.test for f in rep.flaky] == [f"{M}::test_flaky"]


@pytest.mark.parametrize("text,days", [("14d", 14), ("36h", 1.5), ("2w", 14)])
def test_parse_since(text: str, days: float) -> None:
    now = datetime(2026, 1, 20, tzinfo=timezone.utc)
    assert report.parse_since(text, now) == now - timedelta(days=days)


def test_parse_since_refuses_what_it_cannot_read() -> None:
    from xenpv.base.errors import ConfigError
    with pytest.raises(ConfigError, match=r"--since 'yesterday' is neither N\[hdw\]"):
        report.parse_since("yesterday")


def test_xenpv_report_writes_markdown_html_and_plots(tmp_path: Path, synthetic_nights: list[Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path / 'h.sqlite'}"
    with Store.open(db) as s:
        for night in synthetic_nights:
            ingest(s, night)
    out = tmp_path / "report"
    assert main(["report", "--db", db, "--out", str(out)]) == 0
    assert "3 nights: 1 new failures, 1 flaky, 2 benchmark regressions, 1 missed targets" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert f"| REGR. | {M}::test_regress | AssertionError: grant N leaked |" in md
    assert "## Fixed (1)" in md and "## Flaky tests (1)" in md and f"| {M}::test_flaky | 67% (2/3) | 1 | AssertionError: evtchn N not pending |" in md
    assert "## Crash buckets (1)" in md and "## Missed targets (1)" in md
    assert "Newest night: nightly-3" in md and "commit 333333333333 on ci-1.example" in md
    page = (out / "report.html").read_text()
    assert '<td class="regr">REGR.</td>' in page
    for png in ("results.png", "bench-resume.png", "bench-blk.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'<img src="{png}"' in page


def test_html_escapes_what_the_tests_wrote(tmp_path: Path, nightkit) -> None:
    """A failure message is a test's or the guest's text: on the page it is text, never markup."""
    night = nightkit.write_night(tmp_path / "n", datetime.now(timezone.utc), {
        "t::test_x": [nightkit.Attempt("failed", "AssertionError: <script>alert(1)</script> | pipe")]}, {})
    with Store.open(f"sqlite:///{tmp_path / 'h.sqlite'}") as s:
        ingest(s, night)
        rep = report.build(s.nights_since(SINCE), SINCE)
    page = report.html_page(rep)
    assert "<script>" not in page and "&lt;script&gt;alert(N)&lt;/script&gt;" in page
    assert r"AssertionError: \<script>alert(N)\</script> \| pipe |" in report.markdown(rep)


def _pixels_near(image, rgb: str, tolerance: float = 0.04) -> int:
    import numpy as np
    want = np.array([int(rgb[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image[:, :, :3] - want) < tolerance).all(axis=2).sum())


def test_the_html_page_in_headless_chromium_shows_the_plots(tmp_path: Path, store: Store) -> None:
    """Debian's chromium renders report.html to a PNG: the page loads its plots (the bar colours and the
    trend lines are on the screenshot, which a missing image would not have) and its REGR. cell."""
    from matplotlib.image import imread

    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (ci/bootstrap.sh installs Debian's chromium package)"
    out = tmp_path / "report"
    report.write(store, out, SINCE)
    shot = tmp_path / "shot.png"
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,2400", f"--screenshot={shot}", (out / "report.html").as_uri()]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        log, _ = proc.communicate(timeout=180)
    finally:
        # Its own process group: a renderer or crash handler that outlived the browser goes with it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0 and shot.exists(), log
    image = imread(shot)
    assert image.shape[:2] == (2400, 1280)
    assert _pixels_near(image, "#3a7d44") > 5000, "no passed bars: results.png is not on the page"
    assert _pixels_near(image, "#e0a030") > 500, "no flaky bar"
    assert _pixels_near(image, "#1f5fa8") > 300, "no benchmark trend line"
    assert _pixels_near(image, "#c0392b") > 5000  # failed bars, target lines and the REGR. cell


def test_a_report_of_an_empty_history_says_so(tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'h.sqlite'}") as s:
        rep = report.write(s, tmp_path / "out", SINCE)
    assert rep.nights == [] and rep.plots == []
    md = (tmp_path / "out" / "report.md").read_text()
    assert "No night in the history since" in md and "## New failures (0)" in md
    assert not list((tmp_path / "out").glob("*.png"))
