"""`python -m xenpv.backends.xenstored --socket PATH [--log FILE] [--ring-dir DIR]`: run the daemon until SIGTERM."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from xenpv.backends.xenstored.daemon import Daemon
from xenpv.backends.xenstored.ring_provider import FileRingProvider, PageProvider
from xenpv.backends.xenstored.xenhv_provider import XenhvRingProvider
from xenpv.base.crashtrace import enable_crash_traces


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xenpv.backends.xenstored", description=__doc__)
    p.add_argument("--socket", required=True, type=Path, help="unix socket path for dom0 clients")
    p.add_argument("--log", type=Path, help="log file (default: stderr)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    rings = p.add_mutually_exclusive_group()
    rings.add_argument("--ring-dir", type=Path,
                       help="map introduced domains' rings from DIR/dom<N>.page with FIFO doorbells dom<N>.kick/.call")
    rings.add_argument("--xenhv", type=Path, metavar="SOCKET",
                       help="reach introduced domains' rings through xenhv (its control socket), as a vhost-user back-end")
    p.add_argument("--vhost-socket", type=Path, help="the vhost-user socket to serve with --xenhv "
                                                     "(default: xenstored.vu.sock beside --socket)")
    args = p.parse_args(argv)
    enable_crash_traces()  # a crash leaves every thread's Python stack on stderr (the process log)
    handler: logging.Handler = logging.FileHandler(args.log) if args.log else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("xenstored")
    root.addHandler(handler)
    root.setLevel(args.log_level)
    provider: PageProvider | None = None
    if args.ring_dir:
        provider = FileRingProvider(args.ring_dir)
    elif args.xenhv:
        provider = XenhvRingProvider(args.xenhv, args.vhost_socket or args.socket.with_name("xenstored.vu.sock"))
    daemon = Daemon(args.socket, provider=provider)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
    try:
        daemon.serve_forever()
    finally:
        if isinstance(provider, XenhvRingProvider):
            provider.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
