"""The nightly history on a PostgreSQL server: the store code that runs on the default SQLite file, run
against Debian's PostgreSQL (a cluster of the test's own: initdb and pg_ctl as the `postgres` user in a
temporary directory, listening on a unix socket only, stopped and removed at the end)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tests.unit.nightly.conftest import three_nights
from xenpv.base.process import wait_for
from xenpv.harness.nightly import report
from xenpv.harness.nightly.ingest import ingest
from xenpv.harness.nightly.store import Store, metadata

USER = "postgres"  # Debian's postgresql package makes it; the server refuses to run as root


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    assert found, f"no {name} under /usr/lib/postgresql (ci/bootstrap.sh installs Debian's postgresql)"
    return found[-1]


def _as_postgres(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, user=USER, group=USER, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd="/")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    # Not under pytest's tmp_path: its parents are root's 0700 directories, which the server user cannot enter.
    top = Path(tempfile.mkdtemp(prefix="xenpv-pg-"))
    shutil.chown(top, USER, USER)
    data = top / "data"
    started = False
    try:
        r = _as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", USER, "--auth=trust", "--no-sync",
                          "--encoding=UTF8", "--locale=C"], timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        options = f"-c listen_addresses='' -c unix_socket_directories='{top}' -c fsync=off"
        r = _as_postgres([_pg_bin("pg_ctl"), "start", "-D", str(data), "-w", "-t", "180", "-l",
                          str(top / "server.log"), "-o", options], timeout=240)
        started = True
        assert r.returncode == 0, r.stdout + r.stderr + (top / "server.log").read_text(errors="replace")
        yield f"postgresql+psycopg://{USER}@/postgres?host={top}"
    finally:
        pid = None
        if started:
            pid_file = data / "postmaster.pid"
            pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
            r = _as_postgres([_pg_bin("pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "120"],
                             timeout=180)
            if r.returncode != 0 and pid is not None and Path(f"/proc/{pid}").exists():
                os.kill(pid, 9)  # the server we started and pg_ctl could not stop
        if pid is not None:
            # pg_ctl's -w ends when the server removed its pid file, a moment before the process is gone.
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=60,
                     what=f"the test's PostgreSQL server (pid {pid}) to exit")
        shutil.rmtree(top, ignore_errors=True)
        assert not top.exists()


def test_the_store_and_report_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    nights = three_nights(tmp_path / "nights")
    with Store.open(postgres_url) as store:
        assert store.engine.dialect.name == "postgresql"
        assert store.revision() == Store.head()
        assert set(sa.inspect(store.engine).get_table_names()) == {
            "alembic_version", "nights", "results", "crashes", "figures"}
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        for night in nights:
            ingest(store, night)
        since = datetime.now(timezone.utc) - timedelta(days=14)
        stored = store.nights_since(since)
        rep = report.build(stored, since)
    assert [n.label for n in stored] == ["nightly-1", "nightly-2", "nightly-3"]
    assert all(n.started_at.tzinfo is not None for n in stored)
    assert stored[0].versions == {"python": "3.11.2", "kernel": "6.1.0-18-amd64"}  # JSON column
    m = "tests.integration.test_ring"
    assert [c.test for c in rep.regressions] == [f"{m}::test_regress"]
    assert rep.fixed == [f"{m}::test_fixed"]
    assert [(f.test, f.passed_first, f.ran) for f in rep.flaky] == [(f"{m}::test_flaky", 2, 3)]
    assert [(b.bucket, b.count) for b in rep.buckets] == [("0x7E_XENBUS_store.c_StoreFreePayload", 2)]
    assert sorted((b.benchmark, b.figure) for b in rep.bench_regressions) == [("blk", "ratio"),
                                                                              ("resume", "round trip")]
    assert [(x.benchmark, x.figure) for x in rep.missed_targets] == [("blk", "ratio")]
