"""python -m xenpv.backends.netback --xenstore SOCK --xenhv SOCK --vhost-socket PATH --netns NAME [--log FILE]
[--stats FILE]"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from xenpv.backends.netback.daemon import Netback, enter_netns
from xenpv.base.crashtrace import enable_crash_traces


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m xenpv.backends.netback")
    p.add_argument("--xenstore", required=True, type=Path, help="xenstored's unix socket")
    p.add_argument("--xenhv", required=True, type=Path, help="xenhv's control socket")
    p.add_argument("--vhost-socket", required=True, type=Path, help="where to serve vhost-user for xenhv")
    p.add_argument("--netns", required=True, help="network namespace holding the vifD.N TAP devices")
    p.add_argument("--log", type=Path, default=None)
    p.add_argument("--stats", type=Path, default=None, help="JSON file of per-vif statistics, kept current")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    enable_crash_traces()  # a crash leaves every thread's Python stack on stderr (the process log)
    logging.basicConfig(filename=args.log, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    enter_netns(args.netns)  # before any thread exists: setns affects only the calling thread
    nb = Netback(args.xenstore, args.xenhv, args.vhost_socket, args.stats)
    signal.signal(signal.SIGTERM, lambda *_: nb.stop())
    signal.signal(signal.SIGINT, lambda *_: nb.stop())
    nb.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
