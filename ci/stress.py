#!/usr/bin/env python3
"""The stress run: N copies of the integration suite at once from this checkout, with CPU hogs beside them,
then one verdict on what a driver developer must be able to trust.

    .venv/bin/python ci/stress.py [-n 3] [--hogs 2] [--out DIR] [--deadline MIN] [-- PYTEST-ARGS...]

Each copy is a separate pytest session with its own JUnit file and artifacts directory. Every failing test
is put in one class by its failure text: an agent (or any project process) that crashed, a STOP the test did
not inject (tests that inject one catch their GuestBugcheck and pass), a harness deadline, or another
failure. The run exits 0 only when every test of every copy passed; the table it prints is the figure.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]

# The first pattern that matches a failure's text names its class.
CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("crash", re.compile(r"Fatal Python error|Segmentation fault|SIGSEGV|SIGBUS|SIGABRT|core dumped")),
    ("false STOP", re.compile(r"GuestBugcheck|\*\*\* STOP: 0x")),
    ("harness too slow", re.compile(r"HarnessTooSlow|harness too slow|WaitTimeout|Timeout \(")),
)


@dataclass
class Copy:
    index: int
    out: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None
    tests: int = 0
    skipped: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (test id, class, first line)

    @property
    def junit(self) -> Path:
        return self.out / "junit.xml"


def classify(text: str) -> str:
    for name, pattern in CLASSES:
        if pattern.search(text):
            return name
    return "other failure"


def read_junit(copy: Copy) -> None:
    if not copy.junit.exists():
        copy.failures.append(("(session)", "crash" if (copy.returncode or 0) < 0 else "other failure",
                              f"no JUnit file; pytest exit status {copy.returncode}"))
        return
    for case in ET.parse(copy.junit).getroot().iter("testcase"):
        copy.tests += 1
        if case.find("skipped") is not None:
            copy.skipped += 1
        for bad in (*case.findall("failure"), *case.findall("error")):
            text = f"{bad.get('message', '')}\n{bad.text or ''}"
            first = (bad.get("message") or (bad.text or "").strip().splitlines()[0:1] or [""])
            first_line = first if isinstance(first, str) else first[0]
            copy.failures.append((f"{case.get('classname')}::{case.get('name')}", classify(text), first_line[:160]))


def start_hogs(count: int) -> list[subprocess.Popen[bytes]]:
    # Each hog spins one core at the default priority, as another test run or a build would.
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(count)]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--copies", type=int, default=3, help="suites at once (default 3)")
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="CPU hog processes (default: one per CPU)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default artifacts/stress-<time>)")
    ap.add_argument("--deadline", type=float, default=80.0, help="minutes before every copy is stopped (default 80)")
    ap.add_argument("pytest_args", nargs="*", help="after --: pytest arguments (default: -m integration)")
    args = ap.parse_args(argv)
    if args.copies < 1 or args.hogs < 0:
        ap.error("--copies must be at least 1 and --hogs at least 0")
    out = args.out or TOP / "artifacts" / f"stress-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    out.mkdir(parents=True, exist_ok=False)
    pytest_args = args.pytest_args or ["-m", "integration"]
    copies = [Copy(i, out / f"copy-{i}") for i in range(args.copies)]
    hogs = start_hogs(args.hogs)
    began = time.monotonic()
    try:
        for c in copies:
            c.out.mkdir()
            log = open(c.out / "pytest.log", "wb")
            c.started = time.monotonic()
            c.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={c.junit}",
                 f"--xenpv-artifacts={c.out / 'artifacts'}", *pytest_args],
                cwd=TOP, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
        deadline = began + args.deadline * 60
        running = list(copies)
        while running:
            for c in list(running):
                assert c.proc is not None
                if c.proc.poll() is not None:
                    c.returncode, c.seconds = c.proc.returncode, time.monotonic() - c.started
                    running.remove(c)
            if running and time.monotonic() > deadline:
                print(f"stress: deadline of {args.deadline} min passed; stopping {len(running)} copies", file=sys.stderr)
                stop([c.proc for c in running if c.proc])
                for c in running:
                    c.returncode, c.seconds = c.proc.returncode if c.proc else None, time.monotonic() - c.started
                    c.failures.append(("(session)", "harness too slow", "stopped at the stress run's deadline"))
                break
            time.sleep(1)
    except KeyboardInterrupt:
        stop([c.proc for c in copies if c.proc])
        raise
    finally:
        stop(hogs)
    for c in copies:
        read_junit(c)
    return report(copies, args, out, time.monotonic() - began)


def report(copies: list[Copy], args: argparse.Namespace, out: Path, wall: float) -> int:
    classes = Counter(cls for c in copies for _, cls, _ in c.failures)
    tests = sum(c.tests for c in copies)
    failed = sum(len(c.failures) for c in copies)
    print(f"stress run: {args.copies} copies of the suite at once, {args.hogs} CPU hogs, {wall:.0f} s; results in {out}")
    print(f"{'copy':>4}  {'tests':>5}  {'skipped':>7}  {'failed':>6}  {'seconds':>7}  exit")
    for c in copies:
        print(f"{c.index:>4}  {c.tests:>5}  {c.skipped:>7}  {len(c.failures):>6}  {c.seconds:>7.0f}  {c.returncode}")
    print(f"tests run {tests}, failed {failed}: agent/process crashes {classes['crash']}, "
          f"false STOPs {classes['false STOP']}, harness too slow {classes['harness too slow']}, "
          f"other failures {classes['other failure']}")
    for c in copies:
        for test, cls, first in c.failures:
            print(f"  copy {c.index} [{cls}] {test}: {first}")
    return 0 if failed == 0 and all(c.returncode == 0 for c in copies) else 1


if __name__ == "__main__":
    sys.exit(main())
