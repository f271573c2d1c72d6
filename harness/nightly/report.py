"""The morning report: what the nights in the history say, as Markdown and as a static HTML page with plots.

Sections, newest night against the one before (all within `--since`):
- new failures ("REGR."): failing now, not failing the night before;
- still failing the same way (same signature: STOP bucket or normalised first line) or differently;
- fixed: failing the night before, passing now;
- flaky tests (failed, then passed on the rerun, in any night) with their first-attempt pass rate;
- never passed: every night that ran the test in the window, it failed;
- crash buckets: how often, in which tests, first and last seen;
- benchmark regressions: a figure worse than the median of its previous 7 nights by more than a threshold;
- missed targets: the newest night's figures that miss the target their benchmark states.
"""
from __future__ import annotations

import logging
import statistics
import textwrap
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from xenpv.base.errors import ConfigError
from xenpv.harness.bench.targets import Target
from xenpv.harness.nightly.store import FigureRecord, Night, Result, Store

log = logging.getLogger(__name__)

BASELINE_NIGHTS = 7
DEFAULT_THRESHOLD = 0.10
FAILING = ("failed", "error")
_TIME_UNITS = {"s", "ms", "us", "µs", "ns", "min"}


@dataclass
class Change:
    test: str
    signature: str | None
    before: str | None = None  # the previous night's signature, when it differs
    nights: int = 1  # how many nights in a row it has failed this way


@dataclass
class Flaky:
    test: str
    passed_first: int
    ran: int
    flaky_nights: int
    signature: str | None  # how its latest flaky night's first attempt failed

    @property
    def pass_rate(self) -> float:
        return self.passed_first / self.ran if self.ran else 0.0


@dataclass
class Bucket:
    bucket: str
    count: int
    tests: list[str]
    first_seen: datetime
    last_seen: datetime


@dataclass
class BenchChange:
    benchmark: str
    figure: str
    unit: str
    value: float
    baseline: float
    nights: int  # how many earlier nights the median is of
    change: float  # relative, signed: (value - baseline) / baseline
    direction: str  # "worse" or "changed" (a figure without a known better direction)


@dataclass
class Miss:
    benchmark: str
    figure: str
    unit: str
    value: float | None
    target: str


@dataclass
class NightCounts:
    label: str
    started_at: datetime
    passed: int
    failed: int
    flaky: int
    skipped: int


@dataclass
class Report:
    since: datetime
    nights: list[NightCounts]
    latest: Night | None
    previous: Night | None
    regressions: list[Change] = field(default_factory=list)
    same: list[Change] = field(default_factory=list)
    different: list[Change] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    flaky: list[Flaky] = field(default_factory=list)
    never_passed: list[Change] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    bench_regressions: list[BenchChange] = field(default_factory=list)
    missed_targets: list[Miss] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`14d`, `36h`, `2w` before now, or an ISO date."""
    now = now or datetime.now(timezone.utc)
    units = {"h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
    if text and text[-1] in units and text[:-1].isdigit():
        return now - int(text[:-1]) * units[text[-1]]
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r} is neither N[hdw] (e.g. 14d) nor an ISO date") from None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t


def build(nights: list[Night], since: datetime, threshold: float = DEFAULT_THRESHOLD) -> Report:
    latest = nights[-1] if nights else None
    previous = nights[-2] if len(nights) > 1 else None
    rep = Report(since=since, nights=[_counts(n) for n in nights], latest=latest, previous=previous)
    if latest is None:
        return rep
    now = {r.test: r for r in latest.results}
    before = {r.test: r for r in previous.results} if previous else {}
    history: dict[str, list[Result]] = {}
    for n in nights:
        for r in n.results:
            history.setdefault(r.test, []).append(r)

    for test, r in sorted(now.items()):
        prev = before.get(test)
        if r.outcome in FAILING:
            if prev is None or prev.outcome not in FAILING:
                rep.regressions.append(Change(test, r.signature))
            elif prev.signature == r.signature:
                rep.same.append(Change(test, r.signature, nights=_streak(history[test], r.signature)))
            else:
                rep.different.append(Change(test, r.signature, before=prev.signature))
        elif r.outcome in ("passed", "flaky") and prev is not None and prev.outcome in FAILING:
            rep.fixed.append(test)

    for test, runs in sorted(history.items()):
        ran = [r for r in runs if r.outcome != "skipped"]
        flaky = [r for r in ran if r.outcome == "flaky"]
        if flaky:
            rep.flaky.append(Flaky(test, sum(r.outcome == "passed" for r in ran), len(ran), len(flaky),
                                   flaky[-1].signature))
        if ran and all(r.outcome in FAILING for r in ran):
            rep.never_passed.append(Change(test, ran[-1].signature, nights=len(ran)))
    rep.flaky.sort(key=lambda f: (f.pass_rate, f.test))

    buckets: dict[str, Bucket] = {}
    for n in nights:
        for r in n.results:
            if r.bucket:
                b = buckets.setdefault(r.bucket, Bucket(r.bucket, 0, [], n.started_at, n.started_at))
                b.count += 1
                b.last_seen = n.started_at
                if r.test not in b.tests:
                    b.tests.append(r.test)
    rep.buckets = sorted(buckets.values(), key=lambda b: (-b.count, b.bucket))

    rep.bench_regressions = _bench_regressions(nights, threshold)
    for f in latest.figures:
        if f.target and Target(f.target, f.target_op, f.target_value).met(f.value) is False:
            rep.missed_targets.append(Miss(f.benchmark, f.figure, f.unit, f.value, f.target))
    return rep


def _counts(n: Night) -> NightCounts:
    c = {o: 0 for o in ("passed", "failed", "flaky", "skipped")}
    for r in n.results:
        c["failed" if r.outcome in FAILING else r.outcome] += 1
    return NightCounts(n.label, n.started_at, c["passed"], c["failed"], c["flaky"], c["skipped"])


def _streak(runs: list[Result], signature: str | None) -> int:
    count = 0
    for r in reversed(runs):
        if r.outcome not in FAILING or r.signature != signature:
            break
        count += 1
    return count


def better_direction(f: FigureRecord) -> str | None:
    """'lower' or 'higher' is better: from the target when it is a comparison, else from the unit."""
    if f.target_op in ("<", "<="):
        return "lower"
    if f.target_op in (">", ">="):
        return "higher"
    if f.unit in _TIME_UNITS:
        return "lower"
    if f.unit.endswith("/s") or f.unit in ("IOPS", "ops"):
        return "higher"
    return None


def _bench_regressions(nights: list[Night], threshold: float) -> list[BenchChange]:
    latest, earlier = nights[-1], nights[:-1][-BASELINE_NIGHTS:]
    out = []
    for f in latest.figures:
        if f.value is None:
            continue
        past = [g.value for n in earlier for g in n.figures
                if g.benchmark == f.benchmark and g.figure == f.figure and g.value is not None]
        if not past:
            continue
        baseline = statistics.median(past)
        if baseline == 0:
            continue
        change = (f.value - baseline) / abs(baseline)
        better = better_direction(f)
        if better == "lower" and change > threshold or better == "higher" and change < -threshold:
            direction = "worse"
        elif better is None and abs(change) > threshold:
            direction = "changed"
        else:
            continue
        out.append(BenchChange(f.benchmark, f.figure, f.unit, f.value, baseline, len(past), change, direction))
    return out


# --- plots -------------------------------------------------------------------------------------------------

def plot(nights: list[Night], out: Path) -> list[tuple[str, str]]:
    """PNGs of the pass/fail/flaky counts per night and one per benchmark (its figures' trends, targets
    dashed). matplotlib's object API on the Agg canvas: no pyplot state, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plots = []
    counts = [_counts(n) for n in nights]
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = range(len(counts))
    bottom = [0] * len(counts)
    for attr, colour in (("passed", "#3a7d44"), ("flaky", "#e0a030"), ("failed", "#c0392b"), ("skipped", "#999999")):
        ys = [getattr(c, attr) for c in counts]
        ax.bar(xs, ys, bottom=bottom, color=colour, label=attr)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_xticks(list(xs), [c.started_at.strftime("%m-%d") for c in counts])
    ax.set_ylabel("tests")
    ax.set_title("results per night")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # beside the bars, not on them
    fig.savefig(out / "results.png", dpi=100)
    plots.append(("results.png", "Passed, flaky, failed and skipped tests per night"))

    benches: dict[str, dict[str, list[tuple[int, FigureRecord]]]] = {}
    for i, n in enumerate(nights):
        for f in n.figures:
            benches.setdefault(f.benchmark, {}).setdefault(f.figure, []).append((i, f))
    labels = [n.started_at.strftime("%m-%d") for n in nights]
    for bench, figs in sorted(benches.items()):
        names = sorted(figs)
        cols = min(3, len(names))
        rows = -(-len(names) // cols)
        fig = Figure(figsize=(4 * cols, 2.6 * rows), layout="constrained")
        FigureCanvasAgg(fig)
        for k, name in enumerate(names):
            ax = fig.add_subplot(rows, cols, k + 1)
            points = [(i, f.value) for i, f in figs[name] if f.value is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="#1f5fa8")
            last = figs[name][-1][1]
            if last.target_value is not None:
                ax.axhline(last.target_value, color="#c0392b", linestyle="--", label=f"target {last.target}")
                ax.legend(fontsize="x-small", loc="best")
            ax.set_title(textwrap.fill(name, 48), fontsize="small")
            ax.set_ylabel(last.unit, fontsize="small")
            ax.set_xticks(range(len(nights)), labels, fontsize="x-small")
        fig.suptitle(f"bench {bench}")
        name = f"bench-{_slug(bench)}.png"
        fig.savefig(out / name, dpi=100)
        plots.append((name, f"xenpv bench {bench}: each figure per night, its target dashed"))
    return plots


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


# --- rendering ---------------------------------------------------------------------------------------------

def _when(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M")


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def tables(rep: Report) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """The report's sections as (title, what it means, header, rows): one source for Markdown and HTML."""
    sig = lambda s: s or "(no message)"  # noqa: E731
    return [
        ("New failures", "failing in the newest night, not failing in the night before",
         ["", "test", "how"], [["REGR.", c.test, sig(c.signature)] for c in rep.regressions]),
        ("Still failing the same way", "failing in both nights with the same signature",
         ["test", "how", "nights in a row"], [[c.test, sig(c.signature), str(c.nights)] for c in rep.same]),
        ("Failing differently", "failing in both nights, but not the same way",
         ["test", "now", "before"], [[c.test, sig(c.signature), sig(c.before)] for c in rep.different]),
        ("Fixed", "failing in the night before, passing now", ["test"], [[t] for t in rep.fixed]),
        ("Flaky tests", "failed, then passed on the rerun, in some night; pass rate = first-attempt passes "
         "over nights run", ["test", "pass rate", "flaky nights", "how it failed (latest)"],
         [[f.test, f"{f.pass_rate:.0%} ({f.passed_first}/{f.ran})", str(f.flaky_nights), sig(f.signature)]
          for f in rep.flaky]),
        ("Never passed", "failed in every night that ran it", ["test", "how (latest)", "nights"],
         [[c.test, sig(c.signature), str(c.nights)] for c in rep.never_passed]),
        ("Crash buckets", "guest STOPs by bucket", ["bucket", "count", "first seen", "last seen", "tests"],
         [[b.bucket, str(b.count), _when(b.first_seen), _when(b.last_seen), ", ".join(b.tests)]
          for b in rep.buckets]),
        ("Benchmark regressions", f"newest figure against the median of up to {BASELINE_NIGHTS} nights before",
         ["benchmark", "figure", "now", "median", "change", ""],
         [[b.benchmark, b.figure, f"{_num(b.value)} {b.unit}", f"{_num(b.baseline)} {b.unit} ({b.nights} nights)",
           f"{b.change:+.0%}", b.direction] for b in rep.bench_regressions]),
        ("Missed targets", "the newest night's figures that miss their benchmark's target",
         ["benchmark", "figure", "value", "target"],
         [[m.benchmark, m.figure, f"{_num(m.value)} {m.unit}", m.target] for m in rep.missed_targets]),
    ]


def _summary(rep: Report) -> list[str]:
    if rep.latest is None:
        return [f"No night in the history since {_when(rep.since)}."]
    n, c = rep.latest, rep.nights[-1]
    lines = [f"Newest night: {n.label}, {_when(n.started_at)} UTC, commit {n.commit[:12]} on {n.host}"
             f" (exit status {n.status}).",
             f"{c.passed} passed, {c.failed} failed, {c.flaky} flaky, {c.skipped} skipped;"
             f" {len(rep.nights)} nights since {_when(rep.since)}."]
    if rep.previous is not None:
        lines.append(f"Compared with {rep.previous.label} ({_when(rep.previous.started_at)}).")
    return lines


def markdown(rep: Report) -> str:
    out = ["# xenpv nightly report", "", *_summary(rep), ""]
    for title, meaning, header, rows in tables(rep):
        out += [f"## {title} ({len(rows)})", "", f"_{meaning}_", ""]
        if rows:
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in rows]
        else:
            out.append("none")
        out.append("")
    if rep.plots:
        out += ["## Plots", ""] + [f"![{caption}]({name})" for name, caption in rep.plots] + [""]
    return "\n".join(out)


def _md_cell(text: str) -> str:
    # A test's or the guest's text: it must stay one cell of the table and never become markup.
    return " ".join(text.split()).replace("\\", "\\\\").replace("|", "\\|").replace("<", "\\<")


def html_page(rep: Report) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("xenpv.harness.nightly", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2").render(summary=_summary(rep), sections=tables(rep), plots=rep.plots)


def write(store: Store, out: Path, since: datetime, threshold: float = DEFAULT_THRESHOLD) -> Report:
    """Build the report from the store and write report.md, report.html and the PNGs into `out`."""
    nights = store.nights_since(since)
    out.mkdir(parents=True, exist_ok=True)
    rep = build(nights, since, threshold)
    if nights:
        rep.plots = plot(nights, out)
    (out / "report.md").write_text(markdown(rep))
    (out / "report.html").write_text(html_page(rep))
    log.info("report of %d nights written to %s", len(nights), out)
    return rep


