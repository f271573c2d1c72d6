"""Root conftest: the harness plugin itself (markers, fixtures, artifacts) is `harness.plugin`,
registered through the `pytest11` entry point in pyproject.toml."""
