"""`xenpv xs ls|read|write|rm|watch`: talk to a running xenstored without xenstore-utils."""
from __future__ import annotations

import argparse
import sys

from xenpv.backends.xenstored.client import XsClient, XsConnectionError, XsRequestError, default_socket_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("xs", help="read and change a running xenstored")
    p.add_argument("--socket", default=None, help="daemon socket (default: $XENSTORED_PATH)")
    xsub = p.add_subparsers(dest="xs_command", metavar="COMMAND", required=True)

    ls = xsub.add_parser("ls", help="print a subtree with values (and permissions with -p)")
    ls.add_argument("path", nargs="?", default="/")
    ls.add_argument("-p", "--perms", action="store_true")
    ls.set_defaults(func=lambda a: _run(a, lambda c: _ls(c, a.path, a.perms)))

    rd = xsub.add_parser("read", help="print the values of nodes")
    rd.add_argument("paths", nargs="+")
    rd.set_defaults(func=lambda a: _run(a, lambda c: _read(c, a.paths)))

    wr = xsub.add_parser("write", help="write PATH VALUE pairs (in one transaction)")
    wr.add_argument("pairs", nargs="+", metavar="PATH VALUE")
    wr.set_defaults(func=lambda a: _run(a, lambda c: _write(c, a.pairs)))

    rm = xsub.add_parser("rm", help="remove nodes and their subtrees")
    rm.add_argument("paths", nargs="+")
    rm.set_defaults(func=lambda a: _run(a, lambda c: _rm(c, a.paths)))

    wa = xsub.add_parser("watch", help="print the paths of events on a subtree")
    wa.add_argument("path")
    wa.add_argument("-n", "--count", type=int, default=0, help="stop after N events (0: never)")
    wa.add_argument("--timeout", type=float, default=0.0, help="stop after this many seconds without events")
    wa.set_defaults(func=lambda a: _run(a, lambda c: _watch(c, a.path, a.count, a.timeout)))


def _run(args: argparse.Namespace, action) -> int:
    try:
        with XsClient(args.socket or default_socket_path()) as c:
            return action(c)
    except (XsRequestError, XsConnectionError) as exc:
        print(f"xenpv xs: {exc}", file=sys.stderr)
        return 1


def _ls(c: XsClient, path: str, perms: bool) -> int:
    def walk(p: str, indent: int) -> None:
        for name in c.directory(p):
            child = f"{p.rstrip('/')}/{name}"
            value = c.read(child).decode("utf-8", "backslashreplace")
            line = f"{' ' * indent}{name} = \"{value}\""
            if perms:
                line += f"  ({','.join(c.get_perms(child))})"
            print(line)
            walk(child, indent + 1)
    walk(path, 0)
    return 0


def _read(c: XsClient, paths: list[str]) -> int:
    for p in paths:
        sys.stdout.write(c.read(p).decode("utf-8", "backslashreplace") + "\n")
    return 0


def _write(c: XsClient, pairs: list[str]) -> int:
    if len(pairs) % 2:
        print("xenpv xs write: expected PATH VALUE pairs", file=sys.stderr)
        return 2

    def body(tx: int) -> None:
        for path, value in zip(pairs[::2], pairs[1::2]):
            c.write(path, value, tx)
    c.transact(body)
    return 0


def _rm(c: XsClient, paths: list[str]) -> int:
    for p in paths:
        c.rm(p)
    return 0


def _watch(c: XsClient, path: str, count: int, timeout: float) -> int:
    c.watch(path, "xenpv")
    seen = 0
    while not count or seen < count:
        try:
            epath, _ = c.read_event(timeout if timeout else 365 * 86400.0)
        except XsConnectionError:
            if timeout:
                return 0
            raise
        print(epath, flush=True)
        seen += 1
    return 0
