"""Alembic's environment for the nightly history: always online, on the connection Store.upgrade passes."""
from __future__ import annotations

from alembic import context

from xenpv.harness.nightly.store import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the nightly history migrates through xenpv.harness.nightly.store.Store.upgrade")
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying them
with context.begin_transaction():
    context.run_migrations()
