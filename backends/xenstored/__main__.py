"""`python -m backends.xenstored --socket PATH [--log FILE] [--ring-dir DIR]`: run the daemon until SIGTERM."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from backends.xenstored.daemon import Daemon
from backends.xenstored.ring_provider import FileRingProvider


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backends.xenstored", description=__doc__)
    p.add_argument("--socket", required=True, type=Path, help="unix socket path for dom0 clients")
    p.add_argument("--log", type=Path, help="log file (default: stderr)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--ring-dir", type=Path,
                   help="map introduced domains' rings from DIR/dom<N>.page with FIFO doorbells dom<N>.kick/.call")
    args = p.parse_args(argv)
    handler: logging.Handler = logging.FileHandler(args.log) if args.log else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger("xenstored")
    root.addHandler(handler)
    root.setLevel(args.log_level)
    daemon = Daemon(args.socket, provider=FileRingProvider(args.ring_dir) if args.ring_dir else None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
    daemon.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
