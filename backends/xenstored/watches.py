"""Watches: registration, matching (subtree/exact, depth), relative event paths, special events.

Watches sit below the connections that own them: what a watch needs of its connection is `Watcher`."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from xenpv.backends.xenstored.paths import depth_below, parent_of
from xenpv.backends.xenstored.perms import Access, Perms, access_for
from xenpv.xenabi.xs_wire import XENSTORE_PAYLOAD_MAX, XSD_SOCKMSG, XsdSockmsgType

log = logging.getLogger("xenstored.watches")

_WATCH_EVENT = int(XsdSockmsgType.WATCH_EVENT)


class Watcher(Protocol):
    """The connection a watch belongs to (connection.Connection): who it is and how to reach it."""

    @property
    def domid(self) -> int: ...
    @property
    def privileged(self) -> bool: ...
    @property
    def target(self) -> int | None:
        """SET_TARGET: the connection also acts for this domain."""
    @property
    def send(self) -> Callable[[bytes], None]:
        """Queues one whole message for the peer."""


@dataclass(slots=True)
class Watch:
    conn: Watcher
    path: str  # canonical
    token: bytes
    depth: int | None
    relative_to: str | None  # the implicit prefix to strip from event paths, if set with a relative path


@dataclass(slots=True)
class Event:
    """A change to `path`: `exact` fires only watches on the path itself (removed descendants)."""
    path: str
    exact: bool
    # Unprivileged watchers get the event only if one of these grants them read: the node's permissions
    # (before removal for RM, old and new for SET_PERMS) and its parent's.
    visible_by: tuple[Perms, ...]


def event_payload(watch: Watch, path: str) -> bytes | None:
    if watch.relative_to is not None and path.startswith(watch.relative_to + "/"):
        path = path[len(watch.relative_to) + 1:]
    payload = path.encode("ascii") + b"\0" + watch.token + b"\0"
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        return None  # cxenstored drops oversize events silently
    return payload


def deliver(watch: Watch, path: str) -> None:
    payload = event_payload(watch, path)
    if payload is None:
        log.debug("dropping oversize event %s for domain %d", path[:64], watch.conn.domid)
        return
    watch.conn.send(XSD_SOCKMSG.pack(_WATCH_EVENT, 0, 0, len(payload)) + payload)


class WatchTable:
    def __init__(self) -> None:
        self.by_path: dict[str, list[Watch]] = {}

    def __len__(self) -> int:
        return len(self.by_path)

    def add(self, watch: Watch) -> None:
        self.by_path.setdefault(watch.path, []).append(watch)

    def remove(self, watch: Watch) -> None:
        lst = self.by_path.get(watch.path)
        if lst is None:
            return
        try:
            lst.remove(watch)
        except ValueError:
            return
        if not lst:
            del self.by_path[watch.path]

    def _matching(self, path: str, exact: bool) -> Iterator[Watch]:
        by_path = self.by_path
        lst = by_path.get(path)
        if lst:
            yield from list(lst)
        if exact:
            return
        p = path
        while p != "/":
            p = parent_of(p)
            lst = by_path.get(p)
            if lst:
                yield from list(lst)

    def fire(self, event: Event) -> None:
        if not self.by_path:
            return
        for w in self._matching(event.path, event.exact):
            if w.depth is not None and depth_below(event.path, w.path) > w.depth:
                continue
            conn = w.conn
            if not conn.privileged and not _may_see(conn, event):
                continue
            deliver(w, event.path)

    def fire_special(self, name: str, special_perms: Perms, domid: int | None = None) -> None:
        """@introduceDomain / @releaseDomain; a depth watch on @releaseDomain gets `@releaseDomain/<domid>`."""
        for w in list(self.by_path.get(name, ())):
            if not w.conn.privileged and not access_for(special_perms, w.conn.domid, w.conn.target) & Access.READ:
                continue
            deliver(w, f"{name}/{domid}" if domid is not None and w.depth else name)
        if domid is not None:
            for w in list(self.by_path.get(f"{name}/{domid}", ())):
                deliver(w, f"{name}/{domid}")


def _may_see(conn: Watcher, event: Event) -> bool:
    for perms in event.visible_by:
        if access_for(perms, conn.domid, conn.target) & Access.READ:
            return True
    return False
