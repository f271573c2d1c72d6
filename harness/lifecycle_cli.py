"""`xenpv save DOMAIN FILE [--checkpoint]`, `xenpv restore FILE`, `xenpv migrate DOMAIN`: the toolstack's
save, restore and local migration (harness.lifecycle) for a guest a `xenpv run --console` session runs;
`xenpv shutdown|reboot|hibernate DOMAIN`: control/shutdown=poweroff|reboot|s4 as `xl shutdown` and `xl
reboot` write it, and what the guest's xenagent then does (harness.pvcontrol).

A guest lives in the session that booted it: its agent process is its vCPU and, beyond the RAM file, its
memory, so only that session can save it and restore it. Each `xenpv run --console` therefore serves its
guest's life cycle on `lifecycle.sock` in its dom0 run directory (one JSON request per connection, one JSON
answer); these commands find the session that has the domain (by domid or guest name) - or, for restore,
the guest whose agent made the save image - and ask it. The session does the work and prints nothing;
the command prints what happened and exits 0, 1 when the operation failed (the reason on one line), 2 when
no session has what it names.
"""
from __future__ import annotations

import argparse
import json
import logging
import socket
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from xenpv.base.errors import ConfigError, HarnessError
from xenpv.base.rundir import base_dir
from xenpv.harness import lifecycle, pvcontrol

log = logging.getLogger("harness.lifecycle_cli")

SOCKET_NAME = "lifecycle.sock"
MAX_REQUEST = 1 << 16
# A save or a restore of a large guest takes seconds; the client waits this long for the answer.
ANSWER_SECONDS = 300.0


class ServedGuest(Protocol):
    """harness.agent.Guest, as the server drives it."""

    state: str
    domain: Any
    console: Any

    @property
    def name(self) -> str: ...

    def save(self, path: Path, *, checkpoint: bool = False) -> Any: ...

    def restore(self, path: Path) -> Any: ...

    def migrate(self) -> Any: ...


# `xenpv OP DOMAIN` -> the guest's own power path, asked through control/shutdown.
PVCONTROL_OPS = {"shutdown": pvcontrol.shutdown, "reboot": pvcontrol.reboot, "hibernate": pvcontrol.hibernate}


class LifecycleServer:
    """Serves one session's guest on `<run_dir>/lifecycle.sock` from a thread; `lock` is held around each
    operation (the session's own console loop may take it too)."""

    def __init__(self, guest: ServedGuest, run_dir: Path) -> None:
        self.guest = guest
        self.path = run_dir / SOCKET_NAME
        self.lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(4)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="lifecycle-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5.0)
                try:
                    answer = self._answer(_read_line(conn))
                except (OSError, ValueError) as exc:
                    answer = {"error": f"bad request: {exc}"}
                try:
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError as exc:
                    log.info("lifecycle client left before its answer: %s", exc)

    def describe(self) -> dict[str, Any]:
        g = self.guest
        return {"name": g.name, "state": g.state, "domid": g.domain.domid if g.domain is not None else None,
                "agent_pid": g.console.pid}

    def _answer(self, line: bytes) -> dict[str, Any]:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            raise ValueError("a request is an object with a string 'op'")
        op = request["op"]
        with self.lock:
            if op == "list":
                return {"ok": [self.describe()]}
            try:
                if op == "save":
                    timings = self.guest.save(Path(request["path"]), checkpoint=bool(request.get("checkpoint")))
                elif op == "restore":
                    timings = self.guest.restore(Path(request["path"]))
                elif op == "migrate":
                    timings = self.guest.migrate()
                elif op in PVCONTROL_OPS:
                    timings = PVCONTROL_OPS[op](self.guest)  # type: ignore[arg-type]
                else:
                    return {"error": f"unknown op {op!r}"}
            except (HarnessError, KeyError, TypeError) as exc:
                return {"error": str(exc)}
            return {"ok": {"guest": self.describe(), "timings": asdict(timings)}}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._sock.close()
        self.path.unlink(missing_ok=True)


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError(f"request longer than {MAX_REQUEST} bytes")
    return data.split(b"\n", 1)[0]


# -- the client commands --------------------------------------------------------------------------------

def _ask(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        line = _read_line(s)
    if not line:
        raise OSError("the session closed the connection without answering")
    return json.loads(line)


def sessions() -> list[tuple[Path, dict[str, Any]]]:
    """Every live session's socket and the guest it serves (dead ones' sockets do not answer)."""
    found = []
    for path in sorted(base_dir().glob(f"*/{SOCKET_NAME}")):
        try:
            answer = _ask(path, {"op": "list"}, 5.0)
        except (OSError, ValueError):
            continue
        for guest in answer.get("ok", []):
            found.append((path, guest))
    return found


def _session_of(domain: str) -> tuple[Path, dict[str, Any]]:
    matches = [(p, g) for p, g in sessions() if str(g.get("domid")) == domain or g.get("name") == domain]
    if not matches:
        running = ", ".join(f"{g['name']} dom{g['domid']}" for _, g in sessions()) or "none"
        raise ConfigError(f"no running `xenpv run --console` session has domain {domain!r} (sessions: {running})")
    if len(matches) > 1:
        raise ConfigError(f"{len(matches)} sessions have a domain {domain!r}: name it by domid")
    return matches[0]


def _report(what: str, answer: dict[str, Any]) -> int:
    if "error" in answer:
        print(f"xenpv {what}: {answer['error']}")
        return 1
    result = answer["ok"]
    g, steps = result["guest"], result["timings"]["steps"]
    total = sum(v for k, v in steps.items() if k != "qemu_migrate") * 1000
    print(f"{what}: {g['name']} is {g['state']}" + (f" in dom{g['domid']}" if g["domid"] is not None else "")
          + f" ({total:.0f} ms: " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in steps.items()) + ")")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    path, _ = _session_of(args.domain)
    target = Path(args.file).resolve()
    return _report("save", _ask(path, {"op": "save", "path": str(target), "checkpoint": args.checkpoint}, ANSWER_SECONDS))


def cmd_restore(args: argparse.Namespace) -> int:
    image = Path(args.file).resolve()
    manifest = lifecycle.read_manifest(image)  # a bad file is named here, before any session is asked
    matches = [(p, g) for p, g in sessions() if g.get("agent_pid") == manifest.agent_pid]
    if not matches:
        raise ConfigError(f"{image}: the guest that saved it (agent pid {manifest.agent_pid}, {manifest.guest_name}) "
                          "is in no running session: a save image restores only into the guest that made it")
    return _report("restore", _ask(matches[0][0], {"op": "restore", "path": str(image)}, ANSWER_SECONDS))


def cmd_migrate(args: argparse.Namespace) -> int:
    path, _ = _session_of(args.domain)
    return _report("migrate", _ask(path, {"op": "migrate"}, ANSWER_SECONDS))


def cmd_pvcontrol(args: argparse.Namespace) -> int:
    path, _ = _session_of(args.domain)
    return _report(args.op, _ask(path, {"op": args.op}, ANSWER_SECONDS))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("save", help="save a domain of a running `xenpv run --console` session to FILE")
    p.add_argument("domain", help="domid or guest name")
    p.add_argument("file", help="the save image to write")
    p.add_argument("--checkpoint", action="store_true", help="the domain runs on afterwards")
    p.set_defaults(func=cmd_save)
    p = sub.add_parser("restore", help="restore a save image into a new QEMU and a new domain")
    p.add_argument("file", help="a save image written by `xenpv save`")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("migrate", help="migrate a domain to a new QEMU and a new domain on this host")
    p.add_argument("domain", help="domid or guest name")
    p.set_defaults(func=cmd_migrate)
    for op, text in (("shutdown", "control/shutdown=poweroff (xl shutdown): the guest powers its machine off"),
                     ("reboot", "control/shutdown=reboot (xl reboot): the guest restarts"),
                     ("hibernate", "control/shutdown=s4: the guest hibernates; its machine powers off")):
        p = sub.add_parser(op, help=text + " (a `xenpv run --console` session's domain)")
        p.add_argument("domain", help="domid or guest name")
        p.set_defaults(func=cmd_pvcontrol, op=op)
