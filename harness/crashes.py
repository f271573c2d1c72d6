"""`xenpv repro`, `xenpv triage` and `xenpv explore`: the crash workflow on top of run records
(base.runrecord), buckets (stack.kernel.bucket) and replays (harness.replay).

- `xenpv repro DUMP [--runs N]`: boots the recorded guest, replays the record and says `reproduced
  (bucket ...)` or `not reproduced: <reason>`; exit status 0 when it reproduced (with --runs, in at least
  --min-rate of the runs, default all), 1 when not, 2 when the dump cannot be replayed. DUMP is a crash
  dump, a finding of `xenpv explore` or a console script written by --minimize.
- `xenpv repro DUMP --minimize`: delta debugging down to the actions (and fault parameters) that keep the
  bucket (harness.minimize); writes a pytest regression test, a console script and the guest YAML.
- `xenpv triage DIR...`: the dumps under the directories grouped by bucket: count, first and last seen,
  an example, and with --repro whether the example reproduces; a Markdown table, and JSON with --json.
- `xenpv explore [GUEST] --seconds N --seed S`: harness.explore; exit status 1 when it found something.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenpv.base.errors import ConfigError
from xenpv.base.rundir import base_dir, make_artifacts_dir, make_run_dir, remove_run_dir
from xenpv.base.runrecord import RunRecord, Schedule
from xenpv.harness.cleanup import reap_stale, run_guarded
from xenpv.harness.replay import STOP, Failure, Outcome, ReplayEnv, load_failure, replayable, require_record

DUMP_PATTERNS = ("crash-*.json", "finding-*.json")


@dataclass
class Target:
    """What `xenpv repro` replays: the record, the bucket it must reach and where it came from."""

    path: Path
    record: RunRecord
    bucket: str
    schedule: dict[str, Any] = field(default_factory=dict)  # the original's scheduling summary


def load_target(path: Path) -> Target:
    if path.suffix == ".console":
        from xenpv.harness.minimize import parse_console_script

        script = parse_console_script(path)
        if script.expect is None:
            raise ConfigError(f"{path}: no `# expect: BUCKET` line: nothing to compare the replay with")
        return Target(path, script.record, script.expect)
    failure = load_failure(path)
    return Target(path, require_record(failure), failure.bucket, failure.schedule)


def _schedule(arg: str | None, record: RunRecord) -> Schedule | None:
    if arg is None:
        return None
    if arg == "seeded":
        return Schedule("seeded", record.seed)
    try:
        return Schedule.parse(arg)
    except ValueError as exc:
        raise ConfigError(f"--schedule {arg}: {exc}") from None


def _artifacts(args: argparse.Namespace, cleanup: contextlib.ExitStack, tag: str) -> tuple[Path, bool]:
    """(directory, kept): --artifacts DIR makes a new directory of the run's own there, kept; otherwise a
    run directory removed at the end."""
    if args.artifacts:
        return make_artifacts_dir(Path(args.artifacts), "--artifacts"), True
    path = make_run_dir(tag)
    cleanup.callback(remove_run_dir, path)
    return path, False


def verdict(outcome: Outcome, target: Target) -> tuple[bool, str]:
    """Whether `outcome` reproduces `target`, and the words for it."""
    if outcome.bucket == target.bucket:
        return True, f"reproduced (bucket {target.bucket})" + _interleaving(outcome, target)
    if outcome.kind == STOP or outcome.finding:
        return False, f"not reproduced: it failed in another bucket, {outcome.bucket} ({outcome.reason})"
    return False, f"not reproduced: {outcome.reason}"


def _interleaving(outcome: Outcome, target: Target) -> str:
    ours, theirs = outcome.schedule, target.schedule
    if ours.get("mode") != "seeded" or theirs.get("mode") != "seeded":
        return ""
    if ours.get("trace") == theirs.get("trace"):
        return f"; the same interleaving ({ours.get('decisions')} scheduling decisions)"
    return (f"; another interleaving ({ours.get('decisions')} scheduling decisions, the original "
            f"{theirs.get('decisions')})")


def cmd_repro(args: argparse.Namespace) -> int:
    target = load_target(Path(args.dump))
    schedule = _schedule(args.schedule, target.record)
    if args.runs < 1 or args.tries < 1:
        raise ConfigError(f"--runs {args.runs} --tries {args.tries}: each at least 1")
    if not 0 <= args.min_rate <= 1:
        raise ConfigError(f"--min-rate {args.min_rate}: a fraction between 0 and 1")
    base_dir()
    events = replayable(target.record.events)
    print(f"replaying {target.path}: guest {target.record.guest_name}, {len(events)} actions, schedule "
          f"{(schedule or target.record.schedule).argument()}; expecting bucket {target.bucket}")

    def body(cleanup: contextlib.ExitStack) -> int:
        reap_stale()
        artifacts, kept = _artifacts(args, cleanup, "repro")
        env = ReplayEnv(artifacts, qemu=args.qemu)
        cleanup.callback(env.close)
        if args.minimize:
            return _minimize(args, target, env, schedule, artifacts, kept)
        reproduced = 0
        t0 = time.monotonic()
        for run in range(1, args.runs + 1):
            outcome = env.replay(target.record, name=f"run-{run}", schedule=schedule, pace=args.pace,
                                 watchdog=args.watchdog)
            ok, words = verdict(outcome, target)
            reproduced += ok
            where = f" [dump {outcome.dump}]" if kept and outcome.dump else ""
            print(words + where if args.runs == 1 else f"run {run}/{args.runs}: {words}{where}", flush=True)
        if args.runs > 1:
            rate = reproduced / args.runs
            print(f"reproduced in {reproduced} of {args.runs} runs ({rate:.0%}; {time.monotonic() - t0:.0f} s)")
        if kept:
            print(f"artifacts: {artifacts}")
        return 0 if reproduced and reproduced / args.runs >= args.min_rate else 1

    return run_guarded(body)


def _minimize(args: argparse.Namespace, target: Target, env: ReplayEnv, schedule: Schedule | None,
              artifacts: Path, kept: bool) -> int:
    from xenpv.harness.minimize import Minimizer, slug, write_console_script, write_regression_test

    record = target.record if schedule is None else RunRecord(**{**target.record.__dict__, "schedule": schedule})
    runs = 0

    def replay(events: list[Any]) -> str | None:
        """The bucket of the first of --tries replays that reaches the target, else of the last one: a
        bug that does not show on every replay must not make ddmin keep actions it does not need."""
        nonlocal runs
        bucket = None
        for _ in range(args.tries):
            runs += 1
            outcome = env.replay(record, events, name=f"min-{runs}", pace=args.pace, watchdog=args.watchdog)
            print(f"  replay {runs}: {len(events)} actions -> {outcome.bucket or outcome.kind}", flush=True)
            if not kept:
                shutil.rmtree(artifacts / f"min-{runs}", ignore_errors=True)
            bucket = outcome.bucket
            if bucket == target.bucket:
                break
        return bucket

    events = replayable(record.events)
    result = Minimizer(target.bucket, replay).run(events)
    out = Path(args.out) if args.out else target.path.parent / f"{target.path.stem}-minimized"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot be made: {exc.strerror}") from None
    name = slug(target.bucket)
    summary = f"{len(events)} recorded actions minimised to {len(result.events)}"
    test = write_regression_test(out / f"test_{name}.py", record, result.events, target.bucket, target.path, summary,
                                 tries=args.tries)
    script = write_console_script(out / f"{name}.console", out / f"{name}.yaml", record, result.events,
                                  target.bucket, target.path)
    print(f"minimised {len(events)} actions to {len(result.events)} in {result.tests} tests, {runs} replays "
          f"({result.seconds:.0f} s), still bucket {target.bucket}:")
    from xenpv.harness.minimize import script_line

    for event in result.events:
        print(f"  {script_line(event)}")
    print(f"regression test: {test}\nconsole script: {script}")
    return 0


# -- keeping a crash's artifacts ---------------------------------------------------------------------------

KEPT_CRASHES = Path("artifacts")  # relative to the working directory, as pytest's <rootdir>/artifacts


def keep_crash_artifacts(source: Path, root: Path | None = None) -> Path:
    """Move a run's artifact directory (a run directory the run would remove) to a new directory of its
    own in `root` (default ./artifacts), readable by everyone (directories 0755, files 0644): a
    bugcheck's dump must outlive the run. Returns the new directory (absolute)."""
    target = make_artifacts_dir((root or KEPT_CRASHES).absolute(), "the crash artifacts directory")
    for entry in sorted(source.iterdir()):
        shutil.move(str(entry), target / entry.name)
    for path in [target, *target.rglob("*")]:
        try:
            path.chmod(0o755 if path.is_dir() else 0o644 | (path.stat().st_mode & 0o111))
        except OSError:
            pass
    return target


def moved(path: Path, source: Path, target: Path) -> Path:
    try:
        return target / path.relative_to(source)
    except ValueError:
        return path


# -- triage -----------------------------------------------------------------------------------------------

@dataclass
class Bucket:
    bucket: str
    kind: str
    summary: str
    dumps: list[Failure] = field(default_factory=list)
    reproduces: str = "-"

    @property
    def first(self) -> Failure:
        return min(self.dumps, key=lambda f: f.written)

    @property
    def last(self) -> Failure:
        return max(self.dumps, key=lambda f: f.written)

    @property
    def example(self) -> Failure:
        """The latest dump that holds a run record (one that can be replayed), else the latest."""
        with_record = [f for f in self.dumps if f.record is not None]
        return max(with_record or self.dumps, key=lambda f: f.written)


def find_dumps(paths: list[Path]) -> list[Path]:
    found: set[Path] = set()
    for path in paths:
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            for pattern in DUMP_PATTERNS:
                found.update(p for p in path.rglob(pattern) if p.is_file())
        else:
            raise ConfigError(f"{path}: no such file or directory")
    return sorted(found)


def triage(paths: list[Path]) -> tuple[list[Bucket], list[str]]:
    buckets: dict[str, Bucket] = {}
    errors: list[str] = []
    for path in find_dumps(paths):
        try:
            failure = load_failure(path)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        entry = buckets.setdefault(failure.bucket, Bucket(failure.bucket, failure.kind, failure.summary))
        entry.dumps.append(failure)
    return sorted(buckets.values(), key=lambda b: (-len(b.dumps), b.bucket)), errors


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def markdown(buckets: list[Bucket]) -> str:
    rows = ["| bucket | count | first seen (UTC) | last seen (UTC) | example | reproduces |",
            "|---|---:|---|---|---|---|"]
    for b in buckets:
        rows.append(f"| `{b.bucket}` | {len(b.dumps)} | {_when(b.first.written)} | {_when(b.last.written)} | "
                    f"{b.example.path} | {b.reproduces} |")
    return "\n".join(rows)


def triage_json(buckets: list[Bucket], errors: list[str]) -> dict[str, Any]:
    return {"buckets": [{"bucket": b.bucket, "kind": b.kind, "summary": b.summary, "count": len(b.dumps),
                         "first_seen": _when(b.first.written), "last_seen": _when(b.last.written),
                         "example": str(b.example.path), "reproduces": b.reproduces,
                         "dumps": [str(f.path) for f in b.dumps]} for b in buckets],
            "unreadable": errors}


def cmd_triage(args: argparse.Namespace) -> int:
    buckets, errors = triage([Path(p) for p in args.dirs])
    if args.repro and buckets:
        base_dir()

        def body(cleanup: contextlib.ExitStack) -> None:
            reap_stale()
            artifacts = make_run_dir("triage")
            cleanup.callback(remove_run_dir, artifacts)
            env = ReplayEnv(artifacts, qemu=args.qemu)
            cleanup.callback(env.close)
            for b in buckets:
                example = b.example
                if example.record is None:
                    b.reproduces = "no record"
                    continue
                target = Target(example.path, example.record, b.bucket, example.schedule)
                ok, words = verdict(env.replay(example.record, name=f"bucket-{buckets.index(b)}"), target)
                b.reproduces = "yes" if ok else "no: " + words.removeprefix("not reproduced: ")
                print(f"{b.bucket}: {words}", file=sys.stderr, flush=True)

        run_guarded(body)
    data = triage_json(buckets, errors)
    if args.json:
        text = json.dumps(data, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            Path(args.json).write_text(text)
    if args.json != "-":
        print(markdown(buckets) if buckets else "no crash dumps found")
        for error in errors:
            print(f"unreadable: {error}", file=sys.stderr)
    return 0


# -- explore ----------------------------------------------------------------------------------------------

def cmd_explore(args: argparse.Namespace) -> int:
    from xenpv.harness.explore import explore
    from xenpv.harness.plugin import resolve_guest  # not at import: it brings pytest in

    guest = resolve_guest(args.guest)
    if args.seconds <= 0:
        raise ConfigError(f"--seconds {args.seconds}: must be more than 0")
    base_dir()
    root = Path(args.artifacts) if args.artifacts else Path("artifacts") / "explore"
    artifacts = make_artifacts_dir(root, "--artifacts")
    print(f"exploring guest {guest.name} for {args.seconds:g} s from seed {args.seed}"
          f"{' with fault injections' if args.faults else ''}; artifacts: {artifacts}", flush=True)

    def body(cleanup: contextlib.ExitStack) -> Any:
        reap_stale()
        return explore(guest, seconds=args.seconds, seed=args.seed, artifacts=artifacts, faults=args.faults,
                       actions_per_boot=args.actions_per_boot, keep_going=args.keep_going, qemu=args.qemu,
                       watchdog=args.watchdog)

    report = run_guarded(body)
    print(f"{report.actions} actions in {report.boots} boots, {report.seconds:.0f} s: "
          f"{report.actions_per_second:.2f} actions/s; harness too slow {report.too_slow} time(s)")
    for reason in report.not_modelled:
        print(f"ended on a path the harness does not model (no finding): {reason}")
    print("actions: " + ", ".join(f"{k} {v}" for k, v in sorted(report.by_action.items())))
    if not report.findings:
        print("found nothing")
        shutil.rmtree(artifacts, ignore_errors=True) if not args.artifacts else None
        return 0
    for f in report.findings:
        print(f"FOUND {f.outcome.kind} in bucket {f.outcome.bucket} (boot {f.boot}, action {f.action}): "
              f"{f.outcome.reason}\n  dump: {f.outcome.dump}\n  next: xenpv repro {f.outcome.dump} --minimize")
    return 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--qemu", default=None, help="QEMU binary (default: $XENPV_QEMU or the Xen build)")
        p.add_argument("--watchdog", type=float, default=90.0, metavar="S",
                       help="a console line that has not come back in S seconds (scaled by XENPV_TIME_SCALE) "
                            "is a hang (default %(default)s)")

    p = sub.add_parser("repro", help="replay a crash dump's run record: reproduced (bucket ...) or not")
    p.add_argument("dump", help="a crash dump (crash-*.json), a finding (finding-*.json) or a console script")
    p.add_argument("--runs", type=int, default=1, metavar="N", help="replay N times and report the rate")
    p.add_argument("--min-rate", type=float, default=1.0, metavar="R",
                   help="with --runs, exit 0 when at least this fraction reproduced (default: all)")
    p.add_argument("--minimize", action="store_true",
                   help="delta-debug the actions down to those that keep the bucket; write a regression test "
                        "and a console script")
    p.add_argument("--out", default=None, metavar="DIR", help="where --minimize writes (default: beside the dump)")
    p.add_argument("--tries", type=int, default=1, metavar="K",
                   help="with --minimize, a candidate reproduces when one of K replays does (for bugs that "
                        "do not show every time; default %(default)s)")
    p.add_argument("--schedule", default=None, help="override the recorded schedule: os, seeded or seeded:SEED")
    p.add_argument("--pace", choices=("recorded", "asap"), default="recorded",
                   help="keep the recorded gaps between actions (default), or none")
    p.add_argument("--artifacts", default=None, metavar="DIR",
                   help="keep every replay's logs and dumps in a new directory of this run's own inside DIR")
    common(p)
    p.set_defaults(func=cmd_repro)

    p = sub.add_parser("triage", help="group crash dumps and findings by bucket (Markdown table; JSON)")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="directories searched for crash-*.json and finding-*.json")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the table as JSON (- : stdout only)")
    p.add_argument("--repro", action="store_true", help="replay each bucket's example once (boots guests)")
    common(p)
    p.set_defaults(func=cmd_triage)

    p = sub.add_parser("explore", help="random actions on a guest until a STOP, a hang or a crash")
    p.add_argument("guest", nargs="?", default="guests/default.yaml", help="guest YAML (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to explore (default %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="the seed every choice comes from (default %(default)s)")
    p.add_argument("--faults", action="store_true", help="also draw the console's fault injections")
    p.add_argument("--actions-per-boot", type=int, default=40, metavar="N",
                   help="start a fresh guest after N actions (default %(default)s)")
    p.add_argument("--keep-going", action="store_true", help="go on after a finding until the time is up")
    p.add_argument("--artifacts", default=None, metavar="DIR",
                   help="findings go to a new directory inside DIR (default: ./artifacts/explore)")
    common(p)
    p.set_defaults(func=cmd_explore)
