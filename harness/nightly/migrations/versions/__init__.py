"""One module per schema revision of the nightly history; Alembic loads them by path."""
