"""The nightly job and its morning report (issue 17): `xenpv nightly` runs the suite and the benchmarks and
stores the night in a history database (store, ingest); `xenpv report` reads the history and writes the
report in Markdown and HTML with plots (report)."""
