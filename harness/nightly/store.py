"""The nightly history: every night's results, durations, benchmark figures and crash buckets, behind a
database URL (SQLAlchemy Core).

An SQLite file is the default (one machine, one file under artifacts/); a PostgreSQL URL
(`postgresql+psycopg://...`) serves a team on a shared server with the same code. The schema is defined
here and created and changed only by the Alembic migrations beside this module (`Store.open` upgrades a
database to head before using it), so an old history file keeps working after the schema grows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from xenpv.base.errors import ConfigError, HarnessError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")

metadata = sa.MetaData()

nights = sa.Table(
    "nights", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # The night's name (its output directory's): ingesting the same night twice is refused by it.
    sa.Column("label", sa.String(200), nullable=False, unique=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("commit", sa.String(64), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("versions", sa.JSON, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
)

results = sa.Table(
    "results", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("night_id", sa.Integer, sa.ForeignKey("nights.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("test", sa.String(1000), nullable=False, index=True),
    # passed, failed, error, skipped; flaky = failed, then passed on its rerun
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("duration", sa.Float, nullable=False),
    # What tells one failure from another: the STOP bucket when the guest stopped, else the failure's
    # first line with addresses and numbers taken out.
    sa.Column("signature", sa.Text, nullable=True),
    sa.Column("message", sa.Text, nullable=True),
    sa.Column("artifacts", sa.Text, nullable=True),
    sa.UniqueConstraint("night_id", "test"),
)

crashes = sa.Table(
    "crashes", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("night_id", sa.Integer, sa.ForeignKey("nights.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("test", sa.String(1000), nullable=False),
    sa.Column("bucket", sa.String(500), nullable=False, index=True),
    sa.Column("dump", sa.Text, nullable=True),
)

figures = sa.Table(
    "figures", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("night_id", sa.Integer, sa.ForeignKey("nights.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("benchmark", sa.String(200), nullable=False),
    sa.Column("figure", sa.String(300), nullable=False),
    sa.Column("value", sa.Float, nullable=True),  # NULL: the benchmark printed n/a (NaN)
    sa.Column("unit", sa.String(40), nullable=False),
    # The target as the benchmark stated it (text), and as a comparison when it is one: op in <, <=, >, >=.
    sa.Column("target", sa.String(200), nullable=True),
    sa.Column("target_op", sa.String(2), nullable=True),
    sa.Column("target_value", sa.Float, nullable=True),
    sa.UniqueConstraint("night_id", "benchmark", "figure"),
)

OUTCOMES = ("passed", "failed", "error", "skipped", "flaky")


@dataclass
class Result:
    test: str
    outcome: str
    duration: float
    attempts: int = 1
    signature: str | None = None
    message: str | None = None
    artifacts: str | None = None
    bucket: str | None = None
    dump: str | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"test {self.test!r}: outcome {self.outcome!r} is not one of {', '.join(OUTCOMES)}")


@dataclass
class FigureRecord:
    benchmark: str
    figure: str
    value: float | None
    unit: str
    target: str | None = None
    target_op: str | None = None
    target_value: float | None = None


@dataclass
class Night:
    label: str
    started_at: datetime
    commit: str
    host: str
    versions: dict[str, Any] = field(default_factory=dict)
    status: int = 0
    results: list[Result] = field(default_factory=list)
    figures: list[FigureRecord] = field(default_factory=list)
    id: int | None = None


def default_url(artifacts: Path) -> str:
    return f"sqlite:///{(artifacts / 'nightly-history.sqlite').resolve()}"


class Store:
    """One history database. `Store.open(url)` migrates it to the newest schema; close() disposes of it."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, url: str) -> "Store":
        try:
            engine = sa.create_engine(url, future=True)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
            raise ConfigError(f"history database URL {url!r} cannot be used: {exc}") from exc
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_foreign_keys)
            if engine.url.database:
                Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
        store = cls(engine)
        try:
            store.upgrade()
        except sa.exc.DBAPIError as exc:
            engine.dispose()
            raise HarnessError(f"history database {engine.url.render_as_string(hide_password=True)}: "
                               f"{str(exc.orig).strip() or exc}") from exc
        except BaseException:
            engine.dispose()
            raise
        return store

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upgrade(self, revision: str = "head") -> None:
        with self.engine.begin() as conn:
            cfg = _script_config()
            cfg.attributes["connection"] = conn  # migrations/env.py runs on this connection
            command.upgrade(cfg, revision)

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @staticmethod
    def head() -> str | None:
        return ScriptDirectory.from_config(_script_config()).get_current_head()

    def add_night(self, night: Night) -> int:
        """Store one night with everything it measured, in one transaction."""
        with self.engine.begin() as conn:
            if conn.execute(sa.select(nights.c.id).where(nights.c.label == night.label)).first():
                raise ConfigError(f"night {night.label!r} is already in the history")
            night_id = conn.execute(nights.insert().values(
                label=night.label, started_at=_utc(night.started_at), commit=night.commit, host=night.host,
                versions=night.versions, status=night.status)).inserted_primary_key[0]
            if night.results:
                conn.execute(results.insert(), [
                    dict(night_id=night_id, test=r.test, outcome=r.outcome, attempts=r.attempts,
                         duration=r.duration, signature=r.signature, message=r.message, artifacts=r.artifacts)
                    for r in night.results])
            crash_rows = [dict(night_id=night_id, test=r.test, bucket=r.bucket, dump=r.dump)
                          for r in night.results if r.bucket]
            if crash_rows:
                conn.execute(crashes.insert(), crash_rows)
            if night.figures:
                conn.execute(figures.insert(), [
                    dict(night_id=night_id, benchmark=f.benchmark, figure=f.figure, value=f.value, unit=f.unit,
                         target=f.target, target_op=f.target_op, target_value=f.target_value)
                    for f in night.figures])
        log.info("night %s stored as %d (%d results, %d figures)", night.label, night_id,
                 len(night.results), len(night.figures))
        night.id = night_id
        return night_id

    def nights_since(self, since: datetime) -> list[Night]:
        """The nights started at or after `since`, oldest first, with their results and figures."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(nights).where(nights.c.started_at >= _utc(since))
                                .order_by(nights.c.started_at, nights.c.id)).all()
            out = [Night(label=r.label, started_at=_utc(r.started_at), commit=r.commit, host=r.host,
                         versions=dict(r.versions), status=r.status, id=r.id) for r in rows]
            by_id = {n.id: n for n in out}
            if not by_id:
                return out
            buckets = {(c.night_id, c.test): c for c in conn.execute(
                sa.select(crashes).where(crashes.c.night_id.in_(by_id)))}
            for r in conn.execute(sa.select(results).where(results.c.night_id.in_(by_id)).order_by(results.c.id)):
                crash = buckets.get((r.night_id, r.test))
                by_id[r.night_id].results.append(Result(
                    test=r.test, outcome=r.outcome, duration=r.duration, attempts=r.attempts,
                    signature=r.signature, message=r.message, artifacts=r.artifacts,
                    bucket=crash.bucket if crash else None, dump=crash.dump if crash else None))
            for f in conn.execute(sa.select(figures).where(figures.c.night_id.in_(by_id)).order_by(figures.c.id)):
                by_id[f.night_id].figures.append(FigureRecord(
                    benchmark=f.benchmark, figure=f.figure, value=f.value, unit=f.unit, target=f.target,
                    target_op=f.target_op, target_value=f.target_value))
        return out


def _script_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def _utc(t: datetime) -> datetime:
    # SQLite gives naive datetimes back; every time the store holds is UTC.
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


def _sqlite_foreign_keys(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
