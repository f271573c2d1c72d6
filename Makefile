# Conveniences; the README's two commands are the source of truth.
.PHONY: run test unit integration bench
run:
	./ci/bootstrap.sh run
test:
	./ci/bootstrap.sh test
unit:
	./ci/bootstrap.sh test tests/unit
integration:
	./ci/bootstrap.sh test -m integration
bench:
	./ci/bootstrap.sh && .venv/bin/xenpv bench machine
