"""`xenpv nightly` (run the suite and every benchmark, store the night) and `xenpv report` (the morning
report from the history).

The store's packages (SQLAlchemy, Alembic, matplotlib, Jinja2: pyproject's `nightly` group) are imported
by the handlers, so the rest of `xenpv` works without them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from xenpv.base.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_ARTIFACTS = Path("artifacts")
# Deadlines of the night's steps: the suite's tests have their own (pytest-timeout); these catch a
# session that hangs outside any test, or a benchmark that never ends.
SUITE_HOURS = 6.0
BENCH_MINUTES = 30.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nightly", help="run the suite (JUnit, one rerun of failures) and every benchmark, and "
                       "store the night in the history")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the night's directory (default: artifacts/nightly-<date>-<time>)")
    _db_option(p)
    p.add_argument("-n", "--workers", type=int, default=4, metavar="N",
                   help="pytest-xdist workers for the suite (0: one process); default 4")
    p.add_argument("--reruns", type=int, default=1, metavar="N",
                   help="rerun a failed test N times (a test that passes on a rerun is flaky); default 1")
    p.add_argument("--bench", action="append", default=None, metavar="NAME",
                   help="run only this benchmark (repeatable); default every one")
    p.add_argument("--no-bench", action="store_true", help="run no benchmark")
    p.add_argument("pytest_args", nargs="*", metavar="PYTEST-ARG",
                   help="what pytest runs (after --); default: tests")
    p.set_defaults(func=cmd_nightly)

    r = sub.add_parser("report", help="the morning report from the nightly history: Markdown and HTML with plots")
    r.add_argument("--since", default="14d", help="nights started since N[hdw] ago or an ISO date (default 14d)")
    _db_option(r)
    r.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where report.md, report.html and the PNGs go (default: artifacts/report)")
    r.add_argument("--threshold", type=float, default=10.0, metavar="PERCENT",
                   help="a figure this much worse than its 7-night median is a regression (default 10)")
    r.set_defaults(func=cmd_report)


def _db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, metavar="URL",
                   help="the history database (SQLAlchemy URL, e.g. postgresql+psycopg://host/db); "
                   "default: sqlite:///artifacts/nightly-history.sqlite")


def _db_url(args: argparse.Namespace) -> str:
    from xenpv.harness.nightly.store import default_url
    return args.db or default_url(DEFAULT_ARTIFACTS)


def cmd_report(args: argparse.Namespace) -> int:
    from xenpv.harness.nightly import report
    from xenpv.harness.nightly.store import Store

    if args.threshold < 0:
        raise ConfigError(f"--threshold {args.threshold} is negative")
    out = args.out or DEFAULT_ARTIFACTS / "report"
    with Store.open(_db_url(args)) as store:
        rep = report.write(store, out, report.parse_since(args.since), args.threshold / 100)
    print(f"{len(rep.nights)} nights: {len(rep.regressions)} new failures, {len(rep.flaky)} flaky, "
          f"{len(rep.bench_regressions)} benchmark regressions, {len(rep.missed_targets)} missed targets")
    print(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return 0


def collect_versions(qemu: str | None = None) -> dict[str, object]:
    """What the night ran with: `xenpv version`, QEMU, the kernel, Python and every installed package."""
    versions: dict[str, object] = {
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "packages": {d.metadata["Name"]: d.version for d in metadata.distributions() if d.metadata["Name"]},
    }
    for key, argv in (("xenpv version", [sys.executable, "-m", "xenpv.harness.cli", "version"]),
                      ("qemu", [qemu or os.environ.get("XENPV_QEMU", "/usr/libexec/xen-qemu-system-i386"),
                                "--version"]),
                      ("qemu-system-x86_64", ["qemu-system-x86_64", "--version"])):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            versions[key] = (done.stdout.strip() or done.stderr.strip()).splitlines()[:3]
        except (OSError, subprocess.TimeoutExpired) as exc:
            versions[key] = f"unavailable: {exc}"
    return versions


def git_commit(top: Path) -> str:
    try:
        done = subprocess.run(["git", "-C", str(top), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        commit = done.stdout.strip()
        dirty = subprocess.run(["git", "-C", str(top), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("no git commit: %s", exc)
        return "unknown"
    return (commit + ("+dirty" if dirty else "")) if commit else "unknown"


def _bench_names() -> list[str]:
    from xenpv.harness.bench import load_all
    return sorted(load_all())


def cmd_nightly(args: argparse.Namespace) -> int:
    from xenpv.harness.nightly.ingest import JUNIT_FILE, NIGHT_FILE, ingest
    from xenpv.harness.nightly.store import Store

    started = datetime.now(timezone.utc)
    out: Path = args.out or DEFAULT_ARTIFACTS / f"nightly-{started:%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    if (out / NIGHT_FILE).exists():
        raise ConfigError(f"{out} already holds a night ({NIGHT_FILE}); give a new --out")
    benches = [] if args.no_bench else args.bench or _bench_names()
    unknown = sorted(set(benches) - set(_bench_names()))
    if unknown:
        raise ConfigError(f"--bench {', '.join(unknown)}: no such benchmark")
    top = Path(__file__).resolve().parents[2]
    night = {"label": out.resolve().name, "started_at": started.isoformat(), "commit": git_commit(top),
             "host": socket.getfqdn(), "versions": collect_versions(), "status": None}
    _write_json(out / NIGHT_FILE, night)

    status = 0
    argv = [sys.executable, "-m", "pytest", *(args.pytest_args or [str(top / "tests")]),
            f"--junitxml={out / JUNIT_FILE}", "-o", "junit_family=xunit1",
            f"--xenpv-artifacts={out / 'failures'}", f"--reruns={args.reruns}"]
    if args.workers:
        argv += ["-n", str(args.workers), "--dist", "worksteal"]
    log.info("suite: %s", " ".join(argv))
    status |= _run_step("the suite", argv, SUITE_HOURS * 3600, out / "pytest.log")
    for name in benches:
        argv = [sys.executable, "-m", "xenpv.harness.cli", "bench", name, "--json"]
        status |= _run_step(f"bench {name}", argv, BENCH_MINUTES * 60, out / f"bench-{name}.log",
                            stdout=out / f"bench-{name}.json")
    night["status"] = status
    _write_json(out / NIGHT_FILE, night)

    with Store.open(_db_url(args)) as store:
        stored = ingest(store, out)
    counts: dict[str, int] = {}
    for r in stored.results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    print(f"night {stored.label}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f"; {len(stored.figures)} benchmark figures; stored in {_db_url(args)}")
    print(f"nightly results in {out} (status {status})")
    return status


def _run_step(what: str, argv: list[str], timeout: float, log_path: Path, stdout: Path | None = None) -> int:
    """Run one step of the night with a deadline; 0 when it succeeded, 1 when not (the night goes on)."""
    with open(log_path, "w") as err, open(stdout, "w") if stdout else err as outf:
        try:
            done = subprocess.run(argv, stdout=outf, stderr=err, stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("%s did not end within %.0f s; killed (see %s)", what, timeout, log_path)
            return 1
    if done.returncode:
        log.warning("%s ended with status %d (see %s)", what, done.returncode, log_path)
    return 1 if done.returncode else 0


def _write_json(path: Path, doc: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)
