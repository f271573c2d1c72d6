"""`python -m xenpv.harness.bench.xs_echo --socket PATH`: the bench baseline, a trivial xenstore-framed echo
server with the same loop shape as the daemon (recv many, frame, reply, one send), minus the protocol."""
from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys
from pathlib import Path

from xenpv.xenabi.xs_wire import XSD_SOCKMSG

_HDR = XSD_SOCKMSG.size


def serve(path: Path) -> None:
    sel = selectors.DefaultSelector()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    sel.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytes] = {}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    while not stopping:
        for key, _ in sel.select(0.5):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                sel.register(conn, selectors.EVENT_READ)
                buffers[conn] = b""
                continue
            conn = key.fileobj  # type: ignore[assignment]
            data = conn.recv(256 * 1024)
            if not data:
                sel.unregister(conn)
                conn.close()
                del buffers[conn]
                continue
            buf = buffers[conn] + data
            out = []
            pos, n = 0, len(buf)
            while n - pos >= _HDR:
                mtype, req_id, tx_id, length = XSD_SOCKMSG.unpack_from(buf, pos)
                end = pos + _HDR + length
                if end > n:
                    break
                payload = buf[pos + _HDR:end]
                out.append(XSD_SOCKMSG.pack(mtype, req_id, tx_id, len(payload)) + payload)
                pos = end
            buffers[conn] = buf[pos:]
            if out:
                conn.sendall(b"".join(out))
    listener.close()
    path.unlink(missing_ok=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True, type=Path)
    serve(p.parse_args().socket)
    sys.exit(0)
