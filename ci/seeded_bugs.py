"""Seeded one-line bugs (issue 18): each rule the harness enforces, broken on purpose, must fail its tests.

ci/seeded-bugs.toml lists one hand-made bug per rule of the issue's areas (xenstored's quotas, permissions
and DIRECTORY_PART; xenhv's grant maps, HVM params, add_to_physmap and GNTTABOP_copy; netback's tx frame
checks and offload flags; XENFILT's safe mode, FdoS3ToS4, the installer's veto, blkback's bounds), each with
the tests that must catch it.  For each bug this script copies the work tree, makes the one-line change and
runs those tests: the bug is *caught* when pytest reports a failed test (status 1).  mutmut finds the bugs
nobody thought of (ci/mutation.sh); this list keeps the ones the issue named caught, by name.

With ``--old COMMIT --old-python PY`` it also runs the old suite of COMMIT (default: its tests/unit and
tests/conformance; ``--old-tests PATH``, repeated, to choose) on the same bug, written as it reads in that tree
(``old_line``/``old_file`` where the code has moved), with PY, an interpreter that has COMMIT's dependencies:
the report then says which bugs the old suite missed.

    ci/seeded_bugs.py [--list] [NAME...]
    ci/seeded_bugs.py --old 0c89023 --old-python /tmp/old/.venv/bin/python [NAME...]

Exit status: 0 when every bug is caught by today's tests, 1 when one is not, 2 on a bad list or usage.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
LIST = TOP / "ci" / "seeded-bugs.toml"
PACKAGES = ("harness", "stack", "backends", "base", "xenabi", "guests")
# pytest's status for "a test failed": the only verdict that means the tests saw the bug.
FAILED = 1


class SeededBugError(Exception):
    """A bug of the list cannot be applied as written (names the bug and what was wrong)."""


@dataclass(frozen=True)
class SeededBug:
    name: str
    area: str
    rule: str
    file: str
    line: str
    new: str
    tests: tuple[str, ...]
    after: str | None = None
    old_file: str | None = None
    old_line: str | None = None
    old_new: str | None = None
    old_after: str | None = None

    def change(self, old: bool) -> tuple[str, str, str, str | None]:
        """(file, line, new, after) as the bug reads in today's tree or, when ``old``, in the old one."""
        if not old:
            return self.file, self.line, self.new, self.after
        return (self.old_file or self.file, self.old_line or self.line, self.old_new or self.new,
                self.old_after or self.after)


@dataclass
class Outcome:
    bug: SeededBug
    status: int
    seconds: float
    output: list[str] = field(default_factory=list)


REQUIRED = ("name", "area", "rule", "file", "line", "new", "tests")
OPTIONAL = ("after", "old_file", "old_line", "old_new", "old_after")


def load(path: Path = LIST) -> list[SeededBug]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SeededBugError(f"{path}: {exc}") from exc
    bugs: list[SeededBug] = []
    for i, entry in enumerate(data.get("bug", [])):
        where = f"{path.name}: bug {i + 1} ({entry.get('name', 'unnamed')})"
        missing = [k for k in REQUIRED if not entry.get(k)]
        unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
        if missing or unknown:
            raise SeededBugError(f"{where}: missing {missing}" if missing else f"{where}: unknown keys {unknown}")
        if not isinstance(entry["tests"], list) or not all(isinstance(t, str) for t in entry["tests"]):
            raise SeededBugError(f"{where}: tests must be a list of pytest node ids")
        if entry["line"].strip() == entry["new"].strip():
            raise SeededBugError(f"{where}: new is the line unchanged")
        bugs.append(SeededBug(**{**entry, "tests": tuple(entry["tests"])}))
    names = [b.name for b in bugs]
    if len(set(names)) != len(names):
        raise SeededBugError(f"{path.name}: a name is used twice: {sorted(n for n in names if names.count(n) > 1)}")
    return bugs


def _find(lines: list[str], text: str, start: int, what: str, unique: bool) -> int:
    hits = [i for i in range(start, len(lines)) if lines[i].strip() == text.strip()]
    if not hits or (unique and len(hits) > 1):
        raise SeededBugError(f"{what} has {len(hits)} lines reading {text.strip()!r}, expected 1")
    return hits[0]


def apply(tree: Path, file: str, line: str, new: str, name: str, after: str | None = None) -> None:
    """Replace the one line of ``file`` whose text (without indentation) is ``line`` by ``new``, indented
    as it was.  The line must occur exactly once, or, with ``after`` (a line that occurs once), it is the
    first such line below that one: a bug that lands somewhere else proves nothing."""
    path = tree / file
    try:
        lines = path.read_text().split("\n")
    except OSError as exc:
        raise SeededBugError(f"{name}: {file}: {exc}") from exc
    start = 0 if after is None else _find(lines, after, 0, f"{name}: {file}", unique=True) + 1
    i = _find(lines, line, start, f"{name}: {file}" + (f" below {after.strip()!r}" if after else ""),
              unique=after is None)
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = indent + new.strip()
    path.write_text("\n".join(lines))


def copy_tree(dest: Path, commit: str | None) -> None:
    """Today's work tree (tracked and new files) or ``commit``'s tree into ``dest``."""
    if commit is None:
        # The file list goes to tar as a file: through a pipe, tar's output could fill while it is written.
        listing = dest / ".seeded-files"
        listing.write_bytes(subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=TOP,
                                           check=True, capture_output=True).stdout)
        source = subprocess.Popen(["tar", "--null", "-T", str(listing), "-cf", "-"], cwd=TOP, stdout=subprocess.PIPE)
    else:
        source = subprocess.Popen(["git", "archive", commit], cwd=TOP, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-xf", "-", "-C", str(dest)], stdin=source.stdout, check=True)
    if source.wait() != 0:
        raise SeededBugError(f"copying {commit or 'the work tree'} failed")
    (dest / ".seeded-files").unlink(missing_ok=True)


def _module(file: str, old: bool) -> str:
    """The module the tests import for ``file``: itself, or for a native source (built at first use next
    to it, see xenabi/native.py) the package that holds it."""
    name = (file.removesuffix(".py") if file.endswith(".py") else file.rpartition("/")[0]).replace("/", ".")
    return name if old else f"xenpv.{name}"


def run_bug(bug: SeededBug, python: str, tests: list[str], old: str | None) -> Outcome:
    file, line, new, after = bug.change(old is not None)
    with tempfile.TemporaryDirectory(prefix="xenpv-seeded.") as tmp:
        tree = Path(tmp)
        copy_tree(tree, old)
        apply(tree, file, line, new, bug.name, after)
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        if old is None:
            # Today's tree imports as the `xenpv` namespace: a private one, ahead of the editable install.
            ns = tree / ".xenpv-ns" / "xenpv"
            ns.mkdir(parents=True)
            for package in PACKAGES:
                (ns / package).symlink_to(tree / package)
            env["PYTHONPATH"] = str(tree / ".xenpv-ns")
        else:
            env["PYTHONPATH"] = str(tree)
        # The mutated copy must be what the tests import, not an installed tree beside it.
        where = subprocess.run([python, "-c", "import importlib.util, sys; "
                                "print(importlib.util.find_spec(sys.argv[1]).origin)", _module(file, old is not None)],
                               cwd=tree, env=env, capture_output=True, text=True)
        origin = where.stdout.strip()
        if where.returncode != 0 or not Path(origin).resolve().is_relative_to(tree.resolve()):
            raise SeededBugError(f"{bug.name}: the tests would import {_module(file, old is not None)} from "
                                 f"{origin or where.stderr.strip()}, not from the changed copy")
        start = time.monotonic()
        proc = subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-x", "-q", "--no-header",
                               "-o", "timeout=120", *tests], cwd=tree, env=env, capture_output=True, text=True)
        tail = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED tests", "ERROR tests"))][:3]
        summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else [proc.stderr.strip()[-300:]]
        return Outcome(bug, proc.returncode, time.monotonic() - start, tail + summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="bugs to try (default: all)")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    parser.add_argument("--file", type=Path, default=LIST, help="the list (default: ci/seeded-bugs.toml)")
    parser.add_argument("--old", metavar="COMMIT", help="also run COMMIT's suite on each bug")
    parser.add_argument("--old-python", metavar="PY", help="an interpreter with COMMIT's dependencies")
    parser.add_argument("--old-tests", metavar="PATH", action="append",
                        help="a test path of COMMIT to run, repeatable (default: tests/unit and tests/conformance)")
    parser.add_argument("--old-deselect", metavar="NODEID", action="append", default=[],
                        help="a test of COMMIT to leave out (one that fails there unchanged)")
    args = parser.parse_args(argv)
    if args.old and not args.old_python:
        parser.error("--old needs --old-python")
    try:
        bugs = load(args.file)
    except SeededBugError as exc:
        print(f"seeded_bugs: {exc}", file=sys.stderr)
        return 2
    unknown = sorted(set(args.names) - {b.name for b in bugs})
    if unknown:
        print(f"seeded_bugs: no bug named {', '.join(unknown)} (try --list)", file=sys.stderr)
        return 2
    selected = [b for b in bugs if not args.names or b.name in args.names]
    if args.list:
        for b in selected:
            print(f"{b.area:13} {b.name:40} {b.file}\n{'':14}- {b.line.strip()}\n{'':14}+ {b.new.strip()}")
        return 0
    venv = TOP / ".venv" / "bin" / "python"
    python = str(venv) if venv.exists() else sys.executable
    missed = 0
    for bug in selected:
        try:
            now = run_bug(bug, python, list(bug.tests), None)
            before = run_bug(bug, args.old_python,
                                                 [*(args.old_tests or ["tests/unit", "tests/conformance"]),
                                                  *(f"--deselect={t}" for t in args.old_deselect)],
                                                 args.old) if args.old else None
        except SeededBugError as exc:
            print(f"seeded_bugs: {exc}", file=sys.stderr)
            return 2
        caught = now.status == FAILED
        missed += not caught
        verdict = "caught" if caught else f"NOT CAUGHT (pytest status {now.status})"
        print(f"{bug.area:13} {bug.name:40} {verdict:12} {now.seconds:5.1f} s   {bug.rule}")
        print(f"{'':14}{bug.file}: {bug.line.strip()}  ->  {bug.new.strip()}")
        for ln in now.output:
            print(f"{'':14}{ln}")
        if before is not None:
            old_verdict = {0: "missed by the old suite", FAILED: "caught by the old suite too"}.get(
                before.status, f"old suite status {before.status}")
            print(f"{'':14}{args.old}: {old_verdict} ({before.output[-1] if before.output else ''})")
            for ln in before.output[:-1]:
                print(f"{'':14}{args.old}: {ln}")
    print(f"seeded_bugs: {len(selected) - missed} of {len(selected)} caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
