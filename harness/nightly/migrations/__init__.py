"""Alembic migrations of the nightly history (run through harness.nightly.store.Store.upgrade)."""
