"""Turn one night's output directory into a `Night` of the history store.

A night directory holds what `xenpv nightly` wrote: `night.json` (when, which commit, which host, the
versions), `junit.xml` (the suite, run with pytest-rerunfailures' `--reruns 1`) and one `bench-NAME.json`
per benchmark (`xenpv bench NAME --json`). The same code reads them for a real night and for the synthetic
nights of the tests.

With `--reruns`, pytest's JUnit XML has one <testcase> per attempt of a test: a test with more than one
element ran again after failing, and if its last attempt passed it is flaky. Only the last attempt carries
its <failure> (pytest-rerunfailures' earlier attempts are bare elements): how a flaky test failed is the
`xenpv_failure` property the harness's plugin records on every failed attempt.
"""
from __future__ import annotations

import json
import logging
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from xenpv.base.errors import ConfigError
from xenpv.harness.bench.targets import parse_target
from xenpv.harness.nightly.store import FigureRecord, Night, Result, Store

log = logging.getLogger(__name__)

NIGHT_FILE = "night.json"
JUNIT_FILE = "junit.xml"
BENCH_GLOB = "bench-*.json"

# JUnit properties the harness's pytest plugin records on a failing test (harness/plugin.py).
PROP_BUCKET = "xenpv_bucket"
PROP_DUMP = "xenpv_crash_dump"
PROP_ARTIFACTS = "xenpv_artifacts"
PROP_FAILURE = "xenpv_failure"  # the first line of each failed attempt's failure, rerun ones included

_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{5,}|\b[0-9]+(?:\.[0-9]+)?\b")


def signature_of(message: str | None, bucket: str | None) -> str | None:
    """What makes two failures 'the same way': the bucket of a STOP, else the failure's first line with
    numbers and addresses replaced (a different pid or timestamp is not a different failure)."""
    if bucket:
        return f"STOP {bucket}"
    if not message:
        return None
    first = message.strip().splitlines()[0] if message.strip() else ""
    return _ADDRESS_RE.sub("N", first)[:500]


def parse_junit(path: Path) -> list[Result]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ConfigError(f"JUnit file {path} cannot be read: {exc}") from exc
    attempts: dict[str, list[ET.Element]] = {}
    for case in root.iter("testcase"):
        name = case.get("name")
        if not name:
            raise ConfigError(f"{path}: a <testcase> without a name")
        classname = case.get("classname") or ""
        attempts.setdefault(f"{classname}::{name}" if classname else name, []).append(case)
    out = []
    for test, cases in attempts.items():
        last = cases[-1]
        outcome, message = _outcome(last)
        if outcome == "passed" and len(cases) > 1:
            outcome = "flaky"
            message = _property(cases[0], PROP_FAILURE)
        props: dict[str, str] = {}
        for case in cases:
            for prop in case.iter("property"):
                props.setdefault(prop.get("name", ""), prop.get("value", ""))
        bucket = props.get(PROP_BUCKET) if outcome in ("failed", "error", "flaky") else None
        out.append(Result(
            test=test, outcome=outcome, attempts=len(cases),
            duration=sum(_seconds(c, path) for c in cases),
            signature=signature_of(message, bucket) if outcome != "passed" else None,
            message=message, artifacts=props.get(PROP_ARTIFACTS), bucket=bucket or None,
            dump=props.get(PROP_DUMP)))
    return out


def _property(case: ET.Element, name: str) -> str | None:
    return next((p.get("value") for p in case.iter("property") if p.get("name") == name), None)


def _outcome(case: ET.Element) -> tuple[str, str | None]:
    for tag, outcome in (("error", "error"), ("failure", "failed"), ("skipped", "skipped")):
        el = case.find(tag)
        if el is not None:
            return outcome, el.get("message") or (el.text or "").strip() or None
    return "passed", None


def _seconds(case: ET.Element, path: Path) -> float:
    try:
        value = float(case.get("time", "0") or 0)
    except ValueError as exc:
        raise ConfigError(f"{path}: test {case.get('name')!r} has time {case.get('time')!r}") from exc
    return value if math.isfinite(value) and value >= 0 else 0.0


def parse_bench(path: Path) -> list[FigureRecord]:
    """One `xenpv bench NAME --json` object; an empty file (the benchmark failed, its log says why) has none."""
    text = path.read_text()
    if not text.strip():
        log.warning("%s is empty: the benchmark failed (see its .log)", path)
        return []
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"benchmark output {path} is not JSON: {exc}") from exc
    figs = doc.get("figures") if isinstance(doc, dict) else None
    if not isinstance(figs, dict):
        raise ConfigError(f"benchmark output {path} has no 'figures' object")
    bench = path.stem.removeprefix("bench-")
    out = []
    for name, fig in figs.items():
        where = f"{path}: figure {name!r}"
        if not isinstance(fig, dict) or "value" not in fig:
            raise ConfigError(f"{where} has no value")
        value = fig["value"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}: value {value!r} is not a number")
        value = float(value) if value is not None and math.isfinite(value) else None
        unit = str(fig.get("unit", ""))
        target = parse_target(fig.get("target"), unit, where)
        out.append(FigureRecord(benchmark=bench, figure=str(name), value=value, unit=unit,
                                target=target.text, target_op=target.op, target_value=target.value))
    return out


def read_night(directory: Path) -> Night:
    meta_path = directory / NIGHT_FILE
    try:
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        started = datetime.fromisoformat(meta["started_at"])
        night = Night(label=str(meta.get("label") or directory.name), started_at=started,
                      commit=str(meta["commit"]), host=str(meta["host"]), versions=dict(meta.get("versions", {})),
                      status=int(meta.get("status", 0)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"night description {meta_path} cannot be used: {exc!r}") from exc
    junit = directory / JUNIT_FILE
    if junit.exists():
        night.results = parse_junit(junit)
    else:
        log.warning("%s has no %s: the suite did not run", directory, JUNIT_FILE)
    for bench in sorted(directory.glob(BENCH_GLOB)):
        night.figures += parse_bench(bench)
    return night


def ingest(store: Store, directory: Path) -> Night:
    """Read a night directory and store it; the night (with its id) is returned."""
    night = read_night(directory)
    store.add_night(night)
    return night
