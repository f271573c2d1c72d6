"""The `xenpv bench` framework: every benchmark prints a readable table, or one JSON object with --json.

A benchmark is a function registered with `@benchmark(name)`; it returns a `BenchReport`. Baselines run
in the same command and appear as rows of the same report, with ratios computed here.
Benchmarks live beside what they measure; `BENCH_MODULES` lists the modules that register them.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
from dataclasses import dataclass, field
from typing import Callable

from xenpv.harness.bench.targets import target_json

BENCH_MODULES = (
    "xenpv.harness.bench.machine",
    "xenpv.harness.bench.boot",
    "xenpv.harness.bench.xenstore",
    "xenpv.harness.bench.evtchn",
    "xenpv.harness.bench.blk",
    "xenpv.harness.bench.net",
    "xenpv.harness.bench.scale",
    "xenpv.harness.bench.resume",
)


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str = ""  # e.g. "<= 450 ms" (a comparison, in the figure's unit or none): shown, never asserted


@dataclass
class BenchReport:
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, value: float, unit: str, target: str = "") -> Figure:
        f = Figure(name, value, unit, target)
        self.figures.append(f)
        return f

    def ratio(self, name: str, numerator: Figure, denominator: Figure) -> Figure:
        value = numerator.value / denominator.value if denominator.value else float("nan")
        return self.add(name, value, "x")

    def to_json(self) -> dict[str, object]:
        return {
            "benchmark": self.title,
            # A target is {"op": ">=", "value": 0.25} (bench.targets), text only when it is no comparison.
            "figures": {f.name: {"value": f.value, "unit": f.unit,
                                 **({"target": target_json(f.target, f.unit)} if f.target else {})}
                        for f in self.figures},
            "notes": self.notes,
        }

    def to_table(self) -> str:
        rows = [(f.name, _fmt(f.value), f.unit, f.target) for f in self.figures]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(("figure", "value", "unit", "target"))]
        line = "  ".join("{:<%d}" % w if i != 1 else "{:>%d}" % w for i, w in enumerate(widths))
        out = [self.title, line.format("figure", "value", "unit", "target"), line.format(*("-" * w for w in widths))]
        out += [line.format(*r) for r in rows]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def _fmt(v: float) -> str:
    if v != v:  # NaN
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3f}"


def median(samples: list[float]) -> float:
    return statistics.median(samples)


BenchFn = Callable[[argparse.Namespace], BenchReport]
_REGISTRY: dict[str, tuple[BenchFn, str, Callable[[argparse.ArgumentParser], None] | None]] = {}


def benchmark(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    def register(fn: BenchFn) -> BenchFn:
        _REGISTRY[name] = (fn, help, arguments)
        return fn
    return register


def load_all() -> dict[str, tuple[BenchFn, str, Callable[[argparse.ArgumentParser], None] | None]]:
    for mod in BENCH_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            # A module of a component not built yet; any other import error is a bug and propagates.
            if exc.name is None or not mod.startswith(exc.name):
                raise
    return _REGISTRY


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark and print its figures")
    bsub = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, (fn, help_, arguments) in sorted(load_all().items()):
        bp = bsub.add_parser(name, help=help_)
        bp.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        if arguments:
            arguments(bp)
        bp.set_defaults(func=lambda args, fn=fn: _run(fn, args))


def _run(fn: BenchFn, args: argparse.Namespace) -> int:
    report = fn(args)
    print(json.dumps(report.to_json()) if args.json else report.to_table())
    return 0
