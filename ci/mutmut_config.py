"""mutmut 2 hooks for ci/mutation.sh (copied into the private work tree as `mutmut_config.py`).

A mutant is skipped before it runs when it cannot change a rule:
- it sits in a logging call (log.*, the driver model's self._print(...) and debug_log.print(...)), or in
  `logging.getLogger(...)`;
- it only changes the text of an error message: a string inside a `raise`'s call, except the first argument
  when that is an errno or status name (XsError("EACCES", ...): the name is part of the rule), or a string
  passed to a helper's `op`/`what`/`which`/`where` parameter, which only names the caller in messages;
- it changes a type annotation (every module has `from __future__ import annotations`: never evaluated);
- it turns an exception's fallback errno name into an unknown one, which the exception maps back to the
  same fallback (XsError("EINVAL") -> XsError("XXEINVALXX"): still EINVAL on the wire);
- it is listed in ci/mutation-equivalent.txt (path || original line || mutated line || reason).

A mutant that runs runs only the group's tests that executed its line, when ci/mutation.sh measured that
(one run of the group's tests under coverage with per-test contexts, `build_selection`): a mutant in xenhv's
unplug ports no longer waits for the event channel tests before the unplug fuzzers get to it. A line no test
executed in-process (module-level code, code reached only in a subprocess) runs the whole list, and a mutant
that survives its selected files runs the whole list again (mutmut --rerun-all), so selection saves time and
never turns a killed mutant into a survivor.

`classify(filename, line_number, original, mutated)` gives the reason a mutant is skipped (None: it runs);
ci/mutation.sh uses it again when it writes the report, so the report says why each was skipped.
"""
from __future__ import annotations

import ast
import json
import os
import re
import shlex
import sys
from functools import lru_cache
from pathlib import Path

LOG_RECEIVERS = {"log", "logger", "logging"}
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log", "getLogger"}
ERRNO_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
LABEL_PARAMS = {"op", "what", "which", "where"}
# Exceptions that turn an errno name they do not know into a fallback (XsError: the wire carries only
# xsd_errors[] names, anything else is sent as EINVAL), so mutmut's "XXEINVALXX" is EINVAL again.
FALLBACK_ERRNO = {"XsError": "EINVAL"}
DELETED = "<deleted>"  # the mutated line of a mutant that removes a line (a decorator)
SELECTION_ENV = "XENPV_MUTATION_SELECTION"  # the JSON build_selection wrote: file -> line -> test files
RUNNER_ENV = "XENPV_MUTATION_RUNNER"  # the runner command without its test files


def _equivalent_file() -> Path:
    return Path(os.environ.get("XENPV_MUTATION_EQUIVALENT", "ci/mutation-equivalent.txt"))


@lru_cache(maxsize=1)
def equivalents() -> dict[tuple[str, str, str], str]:
    """(path, original line, mutated line) -> reason; lines stripped of surrounding blanks."""
    table: dict[tuple[str, str, str], str] = {}
    path = _equivalent_file()
    if not path.exists():
        return table
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in raw.split(" || ")]  # `||` is no Python operator, `|` is
        if len(parts) != 4 or not all(parts):
            raise ValueError(f"{path}:{n}: want 'path || original line || mutated line || reason', got {raw!r}")
        table[(parts[0], parts[1], "" if parts[2] == DELETED else parts[2])] = parts[3]
    return table


Span = tuple[int, int, int, int]  # line, column, end line, end column (1-based lines, as ast gives them)


def _string_spans(node: ast.AST) -> list[Span]:
    return [(sub.lineno, sub.col_offset, sub.end_lineno or sub.lineno, sub.end_col_offset or 0)
            for sub in ast.walk(node)
            if isinstance(sub, ast.JoinedStr) or (isinstance(sub, ast.Constant) and isinstance(sub.value, str))]


@lru_cache(maxsize=None)
def _not_rules(filename: str) -> tuple[frozenset[int], dict[str, list[Span]]]:
    """Lines of logging calls; the spans of strings that are error-message text (in a raise's call), and of
    type annotations (never evaluated)."""
    tree = ast.parse(Path(filename).read_text(), filename)
    log_lines: set[int] = set()
    spans: dict[str, list[Span]] = {"error message text": [], "annotation": [], "fallback errno name": []}
    # Helpers whose parameter `op`, `what` or `which` only names the caller in their error messages.
    labelled: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            params = [a.arg for a in node.args.posonlyargs + node.args.args]
            is_method = bool(params) and params[0] in ("self", "cls")
            for i, name in enumerate(params):
                if name in LABEL_PARAMS:
                    labelled[node.name] = i - is_method
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            position = labelled.get(callee or "")
            label_args = [k.value for k in node.keywords if k.arg in LABEL_PARAMS]
            if position is not None and position < len(node.args):
                label_args.append(node.args[position])
            for arg in label_args:
                spans["error message text"] += _string_spans(arg)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = node.func.value
            name = receiver.id if isinstance(receiver, ast.Name) else getattr(receiver, "attr", None)
            if ((name in LOG_RECEIVERS and node.func.attr in LOG_METHODS) or node.func.attr == "_print"
                    or (name == "debug_log" and node.func.attr == "print")):  # the guest's DbgPrint
                log_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            args = list(node.exc.args)
            if args and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str) \
                    and ERRNO_NAME.match(args[0].value):
                callee = getattr(node.exc.func, "id", None) or getattr(node.exc.func, "attr", None)
                if callee in FALLBACK_ERRNO and args[0].value == FALLBACK_ERRNO[callee]:
                    # Any other (unknown) name becomes this one again: only a different real name would count.
                    spans["fallback errno name"] += _string_spans(args[0])
                args = args[1:]  # the errno name is the rule; the rest is the message
            for arg in args:
                spans["error message text"] += _string_spans(arg)
        annotations: list[ast.AST | None] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            annotations += [x.annotation for x in a.posonlyargs + a.args + a.kwonlyargs] + [node.returns]
            annotations += [x.annotation for x in (a.vararg, a.kwarg) if x is not None]
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        for ann in annotations:
            if ann is not None:  # `from __future__ import annotations`: never evaluated, whatever the mutation
                spans["annotation"].append((ann.lineno, ann.col_offset, ann.end_lineno or ann.lineno,
                                            ann.end_col_offset or 0))
    return frozenset(log_lines), spans


def _covers(span: Span, line: int, col: int) -> bool:
    start_line, start_col, end_line, end_col = span
    return (start_line, start_col) <= (line, col) < (end_line, end_col)


def _only_string_text(original: str, mutated: str) -> bool:
    """mutmut's string and f-string mutations insert 'XX' inside the quotes and change nothing else."""
    return mutated != original and mutated.replace("XX", "") == original.replace("XX", "")


def classify(filename: str, line_number: int, original: str, mutated: str, relpath: str | None = None) -> str | None:
    """Why this mutant is skipped, or None. `line_number` is 0-based (mutmut's RelativeMutationID)."""
    key = (relpath or filename, original.strip(), mutated.strip())
    reason = equivalents().get(key)
    if reason is not None:
        return f"equivalent: {reason}"
    log_lines, spans = _not_rules(filename)
    line = line_number + 1
    if line in log_lines:
        return "logging"
    col = next((i for i, (a, b) in enumerate(zip(original, mutated)) if a != b), min(len(original), len(mutated)))
    if any(_covers(span, line, col) for span in spans["annotation"]):
        return "annotation"
    if _only_string_text(original, mutated) and any(_covers(span, line, col - 1)
                                                    for span in spans["fallback errno name"]):
        return "fallback errno name"
    # Any change inside a message string (its text, or an expression an f-string formats into it); a
    # string mutation's XX lands just inside the opening quote.
    if any(_covers(span, line, col) or (_only_string_text(original, mutated) and _covers(span, line, col - 1))
           for span in spans["error message text"]):
        return "error message text"
    return None


def mutated_line(context: object) -> str:
    """The text of the mutant's line after mutation (mutmut mutates one token per mutant)."""
    from mutmut import Context, mutate

    c = Context(source=context.source, mutation_id=context.mutation_id, filename=context.filename,  # type: ignore[attr-defined]
                dict_synonyms=context.dict_synonyms, config=context.config)  # type: ignore[attr-defined]
    source, _ = mutate(c)
    return source.split("\n")[context.mutation_id.line_number]  # type: ignore[attr-defined]


# mutmut 2 kills a test run that takes 10 x its baseline run and, racing its own timer, can report the killed
# run as a survivor (its exit status is -9, not 1). The runner's per-test timeout (-o timeout=60) ends a
# mutant that loops; mutmut's own deadline is moved out of the way, so a loaded machine cannot make survivors.
MIN_BASELINE_SECONDS = 300.0


def widen_deadline(config: object) -> None:
    config.baseline_time_elapsed = max(config.baseline_time_elapsed, MIN_BASELINE_SECONDS)  # type: ignore[attr-defined]


def pre_mutation(context: object) -> None:
    widen_deadline(context.config)  # type: ignore[attr-defined]
    mid = context.mutation_id  # type: ignore[attr-defined]
    reason = classify(context.filename, mid.line_number, mid.line, mutated_line(context))  # type: ignore[attr-defined]
    if reason is not None:
        context.skip = True  # type: ignore[attr-defined]
        return
    command = selected_command(context.filename, mid.line_number)  # type: ignore[attr-defined]
    if command is not None:
        context.config.test_command = command  # type: ignore[attr-defined]


def build_selection(coverage_file: Path, test_files: list[str], root: Path) -> dict[str, dict[str, list[str]]]:
    """{source file relative to root: {line (1-based, as text): [ids of the tests that executed it]}}, in the
    group's file order (fastest first), from coverage data recorded with pytest-cov's --cov-context=test
    (contexts "<nodeid>|run", "|setup", "|teardown"; "" is import time, which selects nothing)."""
    from coverage import CoverageData

    order = {t: i for i, t in enumerate(test_files)}
    data = CoverageData(basename=str(coverage_file))
    data.read()
    root = root.resolve()
    table: dict[str, dict[str, list[str]]] = {}
    for measured in data.measured_files():
        try:
            rel = str(Path(measured).resolve().relative_to(root))
        except ValueError:
            continue
        lines: dict[str, list[str]] = {}
        for line, contexts in data.contexts_by_lineno(measured).items():
            tests = {c.rsplit("|", 1)[0] for c in contexts if "::" in c}
            # A test given as a directory (tests/unit/xenbus_interfaces) is selected by its own file.
            ranked = {t: rank for t in tests if (rank := _rank(t.split("::", 1)[0], order)) is not None}
            if ranked:
                lines[str(line)] = sorted(ranked, key=lambda t: (ranked[t], t))
        if lines:
            table[rel] = lines
    return table


def _rank(test_file: str, order: dict[str, int]) -> int | None:
    """The place of `test_file` in the group's list (a file, or a directory holding it); None: not in it."""
    if test_file in order:
        return order[test_file]
    return min((i for t, i in order.items() if test_file.startswith(t.rstrip("/") + "/")), default=None)


@lru_cache(maxsize=1)
def _selection() -> dict[str, dict[str, list[str]]]:
    path = os.environ.get(SELECTION_ENV)
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else {}


def selected_command(filename: str, line_number: int) -> str | None:
    """The runner narrowed to the tests that executed this line (0-based, as mutmut numbers them), or None:
    the line was not seen, run the whole list. mutmut splits the command with shlex: ids are quoted."""
    runner = os.environ.get(RUNNER_ENV)
    tests = _selection().get(filename, {}).get(str(line_number + 1))
    if not runner or not tests:
        return None
    return f"{runner} {' '.join(shlex.quote(t) for t in tests)}"


if __name__ == "__main__":
    # python mutmut_config.py select COVERAGE_FILE OUT_JSON TEST_FILE... (run in the group's work tree)
    if len(sys.argv) < 4 or sys.argv[1] != "select":
        sys.exit("usage: mutmut_config.py select COVERAGE_FILE OUT_JSON TEST_FILE...")
    selection = build_selection(Path(sys.argv[2]), sys.argv[4:], Path.cwd())
    Path(sys.argv[3]).write_text(json.dumps(selection))
    print(f"mutation: test selection by coverage: {sum(len(v) for v in selection.values())} lines of "
          f"{len(selection)} files", file=sys.stderr)
