"""`xenpv`: the command line of the harness.

Each command group lives beside what it drives and exposes `add_parser(subparsers)`; `COMMAND_MODULES`
lists them. A handler returns the process exit status.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "xenpv.harness.commands",
    "xenpv.harness.bench",
    "xenpv.backends.xenstored.cli",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xenpv", description="Integration harness for the Xen Windows PV drivers")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (repeat for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise
            continue  # a component that is not built yet
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    from xenpv.base.errors import HarnessError

    try:
        return int(args.func(args) or 0)
    except HarnessError as exc:
        print(f"xenpv: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
