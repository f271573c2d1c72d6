"""python -m xenpv.backends.blkback --xenstore SOCK --xenhv SOCK --vhost-socket PATH [--log FILE]"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from xenpv.backends.blkback.daemon import Blkback
from xenpv.base.crashtrace import enable_crash_traces


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xenpv.backends.blkback", description="Xen blkif back-end")
    p.add_argument("--xenstore", required=True, type=Path, help="dom0 xenstored socket")
    p.add_argument("--xenhv", required=True, type=Path, help="xenhv control socket")
    p.add_argument("--vhost-socket", required=True, type=Path, help="vhost-user socket to serve for xenhv")
    p.add_argument("--log", type=Path, help="log file (default stderr)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    enable_crash_traces()  # a crash leaves every thread's Python stack on stderr (the process log)
    logging.basicConfig(filename=args.log, level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    daemon = Blkback(args.xenstore, args.xenhv, args.vhost_socket)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
