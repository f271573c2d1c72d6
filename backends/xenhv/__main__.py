"""`python -m xenpv.backends.xenhv --run-dir DIR [--log FILE]`: the hypervisor model, one per host."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from xenpv.backends.xenhv.hypervisor import Hypervisor
from xenpv.backends.xenhv.server import Server
from xenpv.base.crashtrace import enable_crash_traces


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xenpv.backends.xenhv")
    p.add_argument("--run-dir", required=True, type=Path, help="directory for xenhv.sock and the trap sockets")
    p.add_argument("--log", type=Path, help="log file (default: stderr)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    enable_crash_traces()  # a crash leaves every thread's Python stack on stderr (the process log)
    logging.basicConfig(filename=args.log, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    server = Server(args.run_dir, Hypervisor())
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    logging.getLogger("xenhv").info("listening on %s", server.control_path)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
