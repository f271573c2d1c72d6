"""`xs read|ls|write|rm PATH`: xenstore as the guest sees it, through XENBUS's STORE interface."""
from __future__ import annotations

from xenpv.stack.agent.console import command
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.kernel import NT_SUCCESS, status_name


def _store(rt: GuestRuntime):
    fdo = rt.drivers.xenbus.active_fdo if rt.drivers is not None else None
    if fdo is None or "STORE" not in fdo.interfaces:
        raise RuntimeError("no active XENBUS, so no STORE interface: not a Xen guest")
    return fdo.interfaces["STORE"]


@command("xs", "the guest's xenstore, through XENBUS's STORE interface",
         ("read PATH", "ls PATH", "write PATH [VALUE...]", "rm PATH"),
         details="PATH: relative to the domain's home (/local/domain/<domid>) unless it starts with /; "
                 "write joins VALUE's words with single spaces (quote to keep others)")
def _xs(rt: GuestRuntime, args: list[str]) -> str:
    op, path = args[0], args[1]
    store = _store(rt)
    with rt.kernel.cpu.lock:
        if store.acquire() != 0:
            return "STORE: acquire failed"
        try:
            if op == "read":
                status, value = store.StoreRead(None, None, path)
            elif op == "ls":
                status, value = store.StoreDirectory(None, None, path)
            elif op == "write":
                status, value = store.StorePrintf(None, None, path, " ".join(args[2:])), None
            else:
                status, value = store.StoreRemove(None, None, path), None
            if not NT_SUCCESS(status):
                return f"{op} {path}: {status_name(status)}"
            if value is None:
                return "OK"
            text = value.Value.decode(errors="replace")
            store.StoreFree(value)
            return "\n".join(p for p in text.split("\0") if p) if op == "ls" else text
        finally:
            store.release()
