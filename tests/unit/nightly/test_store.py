"""The nightly history store: Alembic migrates an empty database to the schema store.py defines, a night
goes in and comes back whole, and the same night twice is refused."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from xenpv.base.errors import ConfigError, HarnessError
from xenpv.harness.nightly.ingest import ingest, read_night
from xenpv.harness.nightly.store import Store, metadata


def test_an_empty_database_is_upgraded_to_head_with_every_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'sub' / 'history.sqlite'}"  # its directory is made too
    with Store.open(url) as store:
        assert store.revision() == Store.head() == "0001"
        inspector = sa.inspect(store.engine)
        assert set(inspector.get_table_names()) == {"alembic_version", "nights", "results", "crashes", "figures"}
        assert {c["name"] for c in inspector.get_columns("figures")} >= {"target", "target_op", "target_value"}
        # The migrations make exactly the schema store.py reads and writes (no drift between the two).
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    with Store.open(url) as store:  # opening an up-to-date database again changes nothing
        assert store.revision() == "0001"


def test_a_night_round_trips(tmp_path: Path, synthetic_nights: list[Path]) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'h.sqlite'}") as store:
        for night in synthetic_nights:
            ingest(store, night)
        back = store.nights_since(datetime.now(timezone.utc) - timedelta(days=30))
    want = read_night(synthetic_nights[1])
    got = back[1]
    assert [n.label for n in back] == ["nightly-1", "nightly-2", "nightly-3"]
    assert (got.label, got.commit, got.host, got.versions, got.status) == \
        (want.label, want.commit, want.host, want.versions, want.status)
    assert got.started_at == want.started_at
    assert got.results == want.results and got.figures == want.figures
    crash = next(r for r in got.results if r.bucket)
    assert (crash.test, crash.dump, crash.artifacts) == ("tests.integration.test_ring::test_crash",
                                                         "/a/crash-0000007e.json", "/a/test_crash")


def test_the_same_night_twice_is_refused(tmp_path: Path, synthetic_nights: list[Path]) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'h.sqlite'}") as store:
        ingest(store, synthetic_nights[0])
        with pytest.raises(ConfigError, match="night 'nightly-1' is already in the history"):
            ingest(store, synthetic_nights[0])
        assert len(store.nights_since(datetime(2000, 1, 1, tzinfo=timezone.utc))) == 1


def test_a_url_that_names_no_database_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="history database URL 'nosuch://x' cannot be used"):
        Store.open("nosuch://x")


def test_a_database_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite").mkdir()  # a directory where the file should be
    with pytest.raises(HarnessError, match=rf"history database sqlite:///{tmp_path}/dir.sqlite: unable to open"):
        Store.open(f"sqlite:///{tmp_path / 'dir.sqlite'}")
