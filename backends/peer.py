"""A minimal dom0 back-end, the peer of xenhv's integration tests and `xenpv bench evtchn`: it attaches
to a domain over vhost-user, binds the guest's unbound port, and on each event reads a request from
guest memory (a u32 length and the bytes), writes the reply (the bytes reversed) and notifies back;
with --reflect it only notifies back. It prints one line per handled request on stdout.

    python -m xenpv.backends.peer --xenhv SOCK --socket SOCK --domid N --port P (--gpa ADDR | --grant REF | --reflect)
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from xenpv.backends.xenbackend import XenBackend
from xenpv.base.crashtrace import enable_crash_traces


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--xenhv", required=True, type=Path)
    p.add_argument("--socket", required=True, type=Path)
    p.add_argument("--domid", required=True, type=int)
    p.add_argument("--port", required=True, type=int)
    p.add_argument("--gpa", type=lambda s: int(s, 0), default=None)
    p.add_argument("--grant", type=int, default=None, help="map this grant ref instead of using --gpa")
    p.add_argument("--reflect", action="store_true", help="notify back on every event, touching no memory")
    args = p.parse_args()
    enable_crash_traces()  # a crash leaves every thread's Python stack on stderr (the process log)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    be = XenBackend("peer", args.socket, args.xenhv).start()
    try:
        link = be.attach(args.domid)
        state = {"events": 0}
        if args.grant is not None:
            m = be.call("gnttab_map", domid=args.domid, ref=args.grant, readonly=False)
            gpa = m["gfn"] << 12
            print(f"mapped grant {args.grant} at gfn {m['gfn']:#x} handle {m['handle']}", flush=True)
        else:
            gpa = args.gpa

        def reflect() -> None:
            if index_box:
                link.notify(index_box[0])

        def on_event() -> None:
            length = int.from_bytes(link.memory.read(gpa, 4), "little")
            if length == 0 or length > 4000:
                return  # nothing posted yet (or the bind-time kick)
            data = link.memory.read(gpa + 4, length)
            link.memory.write(gpa + 4, data[::-1])
            link.memory.write(gpa, (0).to_bytes(4, "little"))
            state["events"] += 1
            print(f"event {state['events']}: {data.decode(errors='replace')}", flush=True)
            link.notify(index_box[0])

        index_box: list[int] = []  # set once bound; bind() runs the handler once before it returns
        index_box.append(link.bind(args.port, reflect if args.reflect else on_event))
        print(f"bound port {args.port} as channel {index_box[0]}", flush=True)
        done.wait()
        if args.grant is not None:
            be.call("gnttab_unmap", handle=m["handle"])
    finally:
        be.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
