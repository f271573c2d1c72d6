"""`xenpv`: the command line of the harness.

Each command group lives beside what it drives and exposes `add_parser(subparsers)`; `COMMAND_MODULES`
lists them. A handler returns the process exit status: 0 success, 1 a failure (a check, a process), 2 a
setting or input that cannot be used (named in one line), 128+N when signal N ended the run.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

COMMAND_MODULES = (
    "xenpv.harness.commands",
    "xenpv.harness.lifecycle_cli",
    "xenpv.harness.crashes",
    "xenpv.harness.bench",
    "xenpv.harness.nightly.cli",
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
    from xenpv.base.errors import ConfigError, GuestDefinitionError, HarnessError
    from xenpv.harness.cleanup import Interrupted
    from xenpv.stack.timescale import HarnessTooSlow as ModelTooSlow  # the harness's own vCPU links raise it

    try:
        return int(args.func(args) or 0)
    except (ConfigError, GuestDefinitionError) as exc:
        # What the user gave cannot be used: one line naming it, and the status of a usage error.
        print(f"xenpv: {exc}", file=sys.stderr)
        return 2
    except HarnessError as exc:
        print(f"xenpv: {exc}", file=sys.stderr)
        return 1
    except ModelTooSlow as exc:
        print(f"xenpv: {exc} (XENPV_TIME_SCALE gives every deadline more time)", file=sys.stderr)
        return 1
    except Interrupted as exc:
        try:  # after SIGHUP the terminal may be gone
            print(f"xenpv: interrupted by {signal.Signals(exc.signum).name}; cleaned up", file=sys.stderr)
        except OSError:
            pass
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
