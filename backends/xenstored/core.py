"""The xenstore protocol engine: one request in, one reply (and any watch events) out.

Transports frame messages and call `XenstoreCore.handle`; everything a client sends is validated here.
Replies echo req_id and tx_id; errors are `XS_ERROR` with the errno name. Watch events caused by a
request are sent after its reply.

A request that breaks a rule fails with the rule's errno (XsError). Any other exception is a defect of
the daemon: it is logged loudly with the connection, its domain and the request, counted in
`internal_errors`, and answered EIO (as C xenstored answers an internal failure), so one bug does not take
every other connection down. Tests read the count with `XS_CONTROL internal-errors` (dom0 only) and
require zero: a fuzz that only checked for an error reply would take such a defect for a refusal.
"""
from __future__ import annotations

import logging
from typing import Callable

from xenpv.backends.xenstored.connection import Connection
from xenpv.backends.xenstored.domains import Domain, RingAttacher, parse_domid, parse_uint
from xenpv.backends.xenstored.errors import XsError
from xenpv.backends.xenstored.paths import basename, canonicalize, domain_path, parent_of
from xenpv.backends.xenstored.perms import Access, Perm, Perms, access_for, encode_perms, parse_perm
from xenpv.backends.xenstored.quotas import Quotas
from xenpv.backends.xenstored.transactions import Transaction
from xenpv.backends.xenstored.tree import Node, Tree
from xenpv.backends.xenstored.watches import Event, Watch, WatchTable, deliver
from xenpv.xenabi.xs_wire import (
    DOMID_ANY, DOMID_FIRST_RESERVED, DOMID_SELF, XENSTORE_PAYLOAD_MAX, XENSTORE_SERVER_FEATURE_DOMID_ANY,
    XENSTORE_SERVER_FEATURE_ERROR, XENSTORE_SERVER_FEATURE_RECONNECTION, XENSTORE_SERVER_FEATURE_WATCHDEPTH,
    XSD_SOCKMSG, XsdSockmsgType as T,
)

log = logging.getLogger("xenstored.core")

OK = b"OK\0"
SERVER_FEATURES = (XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR
                   | XENSTORE_SERVER_FEATURE_WATCHDEPTH | XENSTORE_SERVER_FEATURE_DOMID_ANY)

_PRIV_ONLY = frozenset(int(t) for t in (T.CONTROL, T.INTRODUCE, T.RELEASE, T.IS_DOMAIN_INTRODUCED, T.RESUME,
                                        T.SET_TARGET, T.SET_FEATURE, T.GET_QUOTA, T.SET_QUOTA))
_IGNORES_TX = frozenset((int(T.WATCH), int(T.UNWATCH)))
_ERROR = int(T.ERROR)
_pack = XSD_SOCKMSG.pack
_PATH_CACHE_ENTRIES = 256
_PATH_CACHE_KEY_MAX = 128
# How many pre-images a dom0 transaction keeps for its snapshot before it is doomed to EAGAIN.
_PRIV_PRESERVE_LIMIT = 1 << 20

Store = Tree | Transaction
Handler = Callable[[Connection, "Transaction | None", bytes], bytes]


def one_arg(payload: bytes) -> bytes:
    """A single NUL-terminated string and nothing else (core.c onearg)."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise XsError("EINVAL", "expected exactly one NUL-terminated argument")
    return payload[:-1]


def args(payload: bytes, lo: int, hi: int) -> list[bytes]:
    if not payload or payload[-1] != 0:
        raise XsError("EINVAL", "arguments not NUL-terminated")
    parts = payload[:-1].split(b"\0")
    if not lo <= len(parts) <= hi:
        raise XsError("EINVAL", f"expected {lo}..{hi} arguments, got {len(parts)}")
    return parts


class XenstoreCore:
    def __init__(self, quotas: Quotas | None = None, attacher: RingAttacher | None = None) -> None:
        self.quotas = quotas or Quotas()
        self.attacher = attacher
        self.tree = Tree()
        self.watches = WatchTable()
        self.domains: dict[int, Domain] = {}
        self.specials: dict[str, Perms] = {
            "@releaseDomain": (Perm(0, Access.NONE), Perm(DOMID_ANY, Access.READ)),
            "@introduceDomain": (Perm(0, Access.NONE),),
        }
        self._pending: list[Event] = []
        self._after_reply: list[Callable[[], None]] = []
        self.internal_errors = 0  # exceptions no rule raised; see the module docstring
        for path in ("/tool", "/tool/xenstored"):
            self._create(None, self.tree, path, b"")
        self.handlers: dict[int, Handler] = {
            int(T.CONTROL): self._control, int(T.DIRECTORY): self._directory, int(T.READ): self._read,
            int(T.GET_PERMS): self._get_perms, int(T.WATCH): self._watch, int(T.UNWATCH): self._unwatch,
            int(T.TRANSACTION_START): self._tx_start, int(T.TRANSACTION_END): self._tx_end,
            int(T.INTRODUCE): self._introduce, int(T.RELEASE): self._release,
            int(T.GET_DOMAIN_PATH): self._get_domain_path, int(T.WRITE): self._write, int(T.MKDIR): self._mkdir,
            int(T.RM): self._rm, int(T.SET_PERMS): self._set_perms,
            int(T.IS_DOMAIN_INTRODUCED): self._is_introduced, int(T.RESUME): self._resume,
            int(T.SET_TARGET): self._set_target, int(T.RESET_WATCHES): self._reset_watches,
            int(T.DIRECTORY_PART): self._directory_part, int(T.GET_FEATURE): self._get_feature,
        }

    # ---- entry points for transports -------------------------------------------------------------------

    def handle(self, conn: Connection, mtype: int, req_id: int, tx_id: int, payload: bytes) -> None:
        handler = self.handlers.get(mtype)
        try:
            if not conn.privileged and mtype in _PRIV_ONLY:
                raise XsError("EACCES", "privileged operation")
            if handler is None:
                raise XsError("ENOSYS", f"type {mtype}")
            tx = None
            if tx_id and mtype not in _IGNORES_TX:
                tx = conn.transactions.get(tx_id)
                if tx is None:
                    raise XsError("ENOENT", f"no transaction {tx_id} on this connection")
            reply = handler(conn, tx, payload)
            if len(reply) > XENSTORE_PAYLOAD_MAX:
                raise XsError("E2BIG", "reply too large")
        except Exception as exc:
            self._pending.clear()
            self._after_reply.clear()
            if not isinstance(exc, XsError):
                # A bug must not take down every other connection with the daemon: fail this request.
                self.internal_error(f"{conn!r} (dom{conn.domid}) request type {mtype} req_id {req_id} "
                                    f"tx {tx_id} payload {payload[:256]!r}", exc)
                exc = XsError("EIO", "internal error")
            elif log.isEnabledFor(logging.DEBUG):
                log.debug("%r type %d -> %s", conn, mtype, exc)
            body = exc.errno_name.encode("ascii") + b"\0"
            conn.send(_pack(_ERROR, req_id, tx_id, len(body)) + body)
            return
        conn.send(_pack(mtype, req_id, tx_id, len(reply)) + reply)
        if self._pending:
            events, self._pending = self._pending, []
            for ev in events:
                self.watches.fire(ev)
        if self._after_reply:
            actions, self._after_reply = self._after_reply, []
            for action in actions:
                action()

    def internal_error(self, what: str, exc: BaseException) -> None:
        """Count and log a defect contained to one request or connection (also called by the daemon)."""
        self.internal_errors += 1
        log.error("INTERNAL ERROR #%d: %s", self.internal_errors, what, exc_info=exc)

    def drop_connection(self, conn: Connection) -> None:
        """Forget everything a connection owns: watches and open transactions."""
        for w in conn.watches.values():
            self.watches.remove(w)
        conn.watches.clear()
        for tx in conn.transactions.values():
            tx.close()
        conn.transactions.clear()

    def dump(self) -> dict[str, tuple[bytes, str]]:
        """The committed tree as {path: (value, perms)}, for tests and diagnostics."""
        return {p: (n.value, encode_perms(n.perms).decode()) for p, n in self.tree.nodes.items()}

    # ---- helpers -------------------------------------------------------------------------------------

    def _path(self, conn: Connection, raw: bytes, special: bool = False) -> str:
        # Clients name the same few paths over and over: remember the canonical form of short ones.
        # Only valid paths are cached, and validity depends on the connection alone (implicit path,
        # privilege), so a per-connection cache is exact.
        cache = conn.path_cache
        path = cache.get(raw)
        if path is not None and (special or path[0] != "@"):
            return path
        path = canonicalize(raw, conn.implicit, allow_special=special,
                            path_quota=None if conn.privileged else self.quotas.path_max)
        if len(raw) <= _PATH_CACHE_KEY_MAX:
            if len(cache) >= _PATH_CACHE_ENTRIES:
                cache.clear()
            cache[raw] = path
        return path

    def _missing(self, conn: Connection, store: Store, path: str) -> XsError:
        """ENOENT, or EACCES when the caller may not read the nearest existing ancestor (errno_from_parents)."""
        if not conn.privileged:
            anc = path
            while anc != "/":
                anc = parent_of(anc)
                node = store.get(anc)
                if node is not None:
                    if not access_for(node.perms, conn.domid, conn.target) & Access.READ:
                        return XsError("EACCES", f"{path}: hidden")
                    break
        return XsError("ENOENT", path)

    def _lookup(self, conn: Connection, store: Store, path: str, need: Access) -> Node:
        node = store.get(path)
        if node is None:
            raise self._missing(conn, store, path)
        if not conn.privileged and access_for(node.perms, conn.domid, conn.target) & need != need:
            raise XsError("EACCES", f"{path}: needs {need!r}")
        return node

    def _emit(self, tx: Transaction | None, event: Event) -> None:
        if tx is not None:
            tx.events[(event.path, event.exact)] = event
        elif self.watches.by_path:
            self._pending.append(event)

    def _check_size(self, conn: Connection | None, value: bytes, perms: Perms, children: dict[str, None]) -> None:
        if conn is None or conn.privileged:
            return
        size = len(value) + 8 * len(perms) + sum(len(c) + 1 for c in children)
        if size > self.quotas.node_size:
            raise XsError("ENOSPC", f"node size {size} over quota")

    def _create(self, conn: Connection | None, store: Store, path: str, value: bytes) -> Node:
        """Create `path` and any missing parents (empty); parents' permissions are inherited."""
        missing = [path]
        top = parent_of(path)
        anc = store.get(top)
        while anc is None:
            missing.append(top)
            top = parent_of(top)
            anc = store.get(top)
        unpriv = conn is not None and not conn.privileged
        if unpriv:
            assert conn is not None
            if not access_for(anc.perms, conn.domid, conn.target) & Access.WRITE:
                raise XsError("EACCES", f"{top}: no write permission to create {path}")
            if store.count_owned(conn.domid) + len(missing) > self.quotas.nodes:
                raise XsError("ENOSPC", f"dom{conn.domid} node quota")
            self._check_size(conn, value, anc.perms, {})
            if isinstance(store, Transaction) and len(store.view) + len(missing) > self.quotas.transaction_nodes:
                raise XsError("ENOSPC", "transaction node quota")
        parent_path, parent = top, anc
        node = parent
        for p in reversed(missing):
            perms = parent.perms
            if unpriv:
                assert conn is not None
                perms = (Perm(conn.domid, perms[0].access),) + perms[1:]
            node = Node(value if p == path else b"", perms)
            store.put(p, node)
            store.modifiable(parent_path).children[basename(p)] = None
            parent_path, parent = p, node
        return node

    def _parent_perms(self, store: Store, path: str) -> tuple[Perms, ...]:
        if path == "/":
            return ()
        parent = store.get(parent_of(path))
        return () if parent is None else (parent.perms,)

    # ---- node operations -----------------------------------------------------------------------------

    def _read(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path = self._path(conn, one_arg(payload))
        return self._lookup(conn, tx or self.tree, path, Access.READ).value

    def _write(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        cut = payload.find(b"\0")
        if cut < 0:
            raise XsError("EINVAL", "WRITE without a path terminator")
        path = self._path(conn, payload[:cut])
        value = payload[cut + 1:]
        store = tx or self.tree
        node = store.get(path)
        if node is None:
            node = self._create(conn, store, path, value)
        else:
            if not conn.privileged:
                if not access_for(node.perms, conn.domid, conn.target) & Access.WRITE:
                    raise XsError("EACCES", f"{path}: no write permission")
                self._check_size(conn, value, node.perms, node.children)
            node = store.modifiable(path)
            node.value = value
        if tx is not None or self.watches.by_path:
            self._emit(tx, Event(path, False, (node.perms,) + self._parent_perms(store, path)))
        return OK

    def _mkdir(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path = self._path(conn, one_arg(payload))
        store = tx or self.tree
        node = store.get(path)
        if node is not None:
            if not conn.privileged and not access_for(node.perms, conn.domid, conn.target) & Access.WRITE:
                raise XsError("EACCES", f"{path}: no write permission")
            return OK  # an existing node is left alone and fires nothing
        node = self._create(conn, store, path, b"")
        self._emit(tx, Event(path, False, (node.perms,) + self._parent_perms(store, path)))
        return OK

    def _rm(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path = self._path(conn, one_arg(payload))
        if path == "/":
            raise XsError("EINVAL", "cannot remove /")
        store = tx or self.tree
        node = store.get(path)
        parent_path = parent_of(path)
        if node is None:
            parent = store.get(parent_path)
            if parent is None:
                raise self._missing(conn, store, parent_path)
            if not conn.privileged and not access_for(parent.perms, conn.domid, conn.target) & Access.READ:
                raise XsError("EACCES", f"{path}: hidden")
            return OK  # removing a missing child of an existing node succeeds
        if not conn.privileged and not access_for(node.perms, conn.domid, conn.target) & Access.WRITE:
            raise XsError("EACCES", f"{path}: no write permission")
        parent = store.get(parent_path)
        assert parent is not None, parent_path
        # Post-order: each removed descendant fires watches on its own path only.
        stack: list[tuple[str, Node, bool]] = [(path, node, False)]
        while stack:
            p, n, expanded = stack.pop()
            if not expanded and n.children:
                stack.append((p, n, True))
                prefix = p + "/"
                for name in n.children:
                    child = store.get(prefix + name)
                    if child is not None:
                        stack.append((prefix + name, child, False))
                continue
            if p != path:
                self._emit(tx, Event(p, True, (n.perms,)))
            store.delete(p)
        store.modifiable(parent_path).children.pop(basename(path), None)
        self._emit(tx, Event(path, False, (node.perms, parent.perms)))
        return OK

    def _children(self, node: Node) -> bytes:
        if not node.children:
            return b""
        return ("\0".join(node.children) + "\0").encode("ascii")

    def _directory(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path = self._path(conn, one_arg(payload))
        return self._children(self._lookup(conn, tx or self.tree, path, Access.READ))

    def _directory_part(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        raw_path, raw_off = args(payload, 2, 2)
        path = self._path(conn, raw_path)
        offset = parse_uint(raw_off, "offset")
        node = self._lookup(conn, tx or self.tree, path, Access.READ)
        data = self._children(node)
        head = str(node.gen).encode("ascii") + b"\0"
        if offset >= len(data):
            return head + b"\0"
        rest = data[offset:]
        room = XENSTORE_PAYLOAD_MAX - len(head) - 1  # keep a byte for the end-of-list terminator
        if len(rest) <= room:
            return head + rest + b"\0"
        cut = rest.rfind(b"\0", 0, room)
        if cut < 0:
            raise XsError("E2BIG", "child name longer than a chunk")
        return head + rest[:cut + 1]

    def _get_perms(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        path = self._path(conn, one_arg(payload), special=True)
        if path[0] == "@":
            perms = self.specials.get(path)
            if perms is None:
                raise XsError("ENOENT", path)
            if not conn.privileged and not access_for(perms, conn.domid, conn.target) & Access.READ:
                raise XsError("EACCES", path)
            return encode_perms(perms)
        return encode_perms(self._lookup(conn, tx or self.tree, path, Access.READ).perms)

    def _set_perms(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        parts = args(payload, 2, 1 + 4096)
        path = self._path(conn, parts[0], special=True)
        perms = tuple(parse_perm(p) for p in parts[1:])
        if not conn.privileged and len(perms) > self.quotas.node_perms:
            raise XsError("ENOSPC", "too many permissions")
        if path[0] == "@":
            if path not in self.specials:
                raise XsError("ENOENT", path)
            if not conn.privileged:
                raise XsError("EACCES", "special node permissions are dom0's")
            self.specials[path] = perms
            return OK
        store = tx or self.tree
        node = self._lookup(conn, store, path, Access.WRITE)
        if not conn.privileged:
            if not access_for(node.perms, conn.domid, conn.target) & Access.OWNER:
                raise XsError("EACCES", f"{path}: only the owner may change permissions")
            if perms[0].domid != node.perms[0].domid:
                raise XsError("EPERM", f"{path}: unprivileged domains cannot change the owner")
            self._check_size(conn, node.value, perms, node.children)
        old = node.perms
        store.put(path, Node(node.value, perms, node.children))
        self._emit(tx, Event(path, False, (perms, old) + self._parent_perms(store, path)))
        return OK

    # ---- watches -------------------------------------------------------------------------------------

    def _watch(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        parts = args(payload, 2, 3)
        raw_path, token = parts[0], parts[1]
        depth = None
        if len(parts) == 3:
            depth = parse_uint(parts[2], "watch depth")  # a leading '-' is rejected: depth < 0 is EINVAL
        path = self._path(conn, raw_path, special=True)
        key = (path, token)
        if key in conn.watches:
            raise XsError("EEXIST", f"watch {path} {token[:32]!r}")
        if not conn.privileged and len(conn.watches) >= self.quotas.watches:
            raise XsError("ENOSPC", f"dom{conn.domid} watch quota")
        relative = raw_path[0] not in b"/@"
        watch = Watch(conn, path, token, depth, conn.implicit if relative else None)
        conn.watches[key] = watch
        self.watches.add(watch)
        self._after_reply.append(lambda: deliver(watch, path))  # the initial event, after the OK
        return OK

    def _unwatch(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        raw_path, token = args(payload, 2, 2)
        path = self._path(conn, raw_path, special=True)
        watch = conn.watches.pop((path, token), None)
        if watch is None:
            raise XsError("ENOENT", f"no watch {path}")
        self.watches.remove(watch)
        return OK

    def _reset_watches(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        self.drop_connection(conn)
        return OK

    # ---- transactions --------------------------------------------------------------------------------

    def _tx_start(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if tx is not None:
            raise XsError("EBUSY", "transaction start inside a transaction")
        if not conn.privileged and len(conn.transactions) >= self.quotas.transactions:
            raise XsError("ENOSPC", f"dom{conn.domid} transaction quota")
        txid = conn.next_txid
        while txid == 0 or txid in conn.transactions:
            txid = (txid + 1) & 0xFFFFFFFF
        conn.next_txid = (txid + 1) & 0xFFFFFFFF
        limit = _PRIV_PRESERVE_LIMIT if conn.privileged else self.quotas.transaction_nodes
        tx = Transaction(self.tree, txid, limit)
        self.tree.open_txs.add(tx)
        conn.transactions[txid] = tx
        return b"%d\0" % txid

    def _tx_end(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if tx is None:
            raise XsError("ENOENT", "TRANSACTION_END outside a transaction")
        arg = one_arg(payload)
        if arg not in (b"T", b"F"):
            raise XsError("EINVAL", f"TRANSACTION_END argument {arg[:8]!r}")
        del conn.transactions[tx.txid]
        tx.close()
        if arg == b"F":
            return OK
        if tx.conflicts():
            raise XsError("EAGAIN", f"transaction {tx.txid} conflicts")
        tx.apply()
        if self.watches.by_path:
            self._pending.extend(tx.events.values())
        return OK

    # ---- domains -------------------------------------------------------------------------------------

    def _introduce(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        raw_dom, raw_gfn, raw_port = args(payload, 3, 3)
        domid = parse_domid(raw_dom)
        gfn = parse_uint(raw_gfn, "gfn")
        port = parse_uint(raw_port, "event channel")
        if port <= 0 or port > 0xFFFFFFFF or domid >= DOMID_FIRST_RESERVED:
            raise XsError("EINVAL", f"INTRODUCE {domid} port {port}")
        dom = self.domains.get(domid)
        if dom is not None:
            dom.port = port
            if dom.conn is not None and self.attacher is not None:
                self.attacher.rebind(dom.conn, port)
            return OK
        ring = self.attacher.attach(domid, gfn, port) if self.attacher is not None else None
        self.domains[domid] = Domain(domid, gfn, port, ring)
        log.info("introduced domain %d (gfn %#x, port %d)", domid, gfn, port)
        if domid != 0:  # introducing the privileged domain itself is not news
            perms = self.specials["@introduceDomain"]
            self._after_reply.append(lambda: self.watches.fire_special("@introduceDomain", perms))
        return OK

    def domain_shutdown(self, domid: int) -> None:
        """The hypervisor reports that a domain shut down or died: fire @releaseDomain once until RESUME."""
        dom = self.domains.get(domid)
        if dom is None or dom.shutdown:
            return
        dom.shutdown = True
        self.watches.fire_special("@releaseDomain", self.specials["@releaseDomain"], domid)

    def release_domain(self, domid: int) -> None:
        dom = self.domains.pop(domid)
        if dom.conn is not None:
            self.drop_connection(dom.conn)
            if self.attacher is not None:
                self.attacher.detach(dom.conn)
        log.info("released domain %d", domid)
        self.watches.fire_special("@releaseDomain", self.specials["@releaseDomain"], domid)

    def _release(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        domid = parse_domid(one_arg(payload))
        if domid not in self.domains:
            raise XsError("ENOENT", f"domain {domid} not introduced")
        self._after_reply.append(lambda: self.release_domain(domid))
        return OK

    def _is_introduced(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        domid = parse_domid(one_arg(payload))
        return b"T\0" if domid in self.domains or domid in (0, DOMID_SELF) else b"F\0"

    def _get_domain_path(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        return domain_path(parse_domid(one_arg(payload))).encode("ascii") + b"\0"

    def _resume(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        dom = self.domains.get(parse_domid(one_arg(payload)))
        if dom is None:
            raise XsError("ENOENT", "domain not introduced")
        dom.shutdown = False
        return OK

    def _set_target(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        raw_dom, raw_target = args(payload, 2, 2)
        dom = self.domains.get(parse_domid(raw_dom))
        target = parse_domid(raw_target)
        if dom is None:
            raise XsError("ENOENT", "domain not introduced")
        if dom.conn is not None:
            dom.conn.target = target
        return OK

    def _get_feature(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        if payload:
            domid = parse_domid(one_arg(payload))
            if not conn.privileged:
                raise XsError("EACCES", "GET_FEATURE of another domain")
            if domid not in self.domains and domid != 0:
                raise XsError("ENOENT", f"domain {domid} not introduced")
        return b"%d\0" % SERVER_FEATURES

    def _control(self, conn: Connection, tx: Transaction | None, payload: bytes) -> bytes:
        parts = args(payload, 1, 64)
        if parts[0] == b"print" and len(parts) == 2:
            log.info("control print: %s", parts[1].decode("ascii", "replace"))
            return OK
        if parts[0] == b"internal-errors" and len(parts) == 1:  # this daemon's own, for tests
            return b"%d\0" % self.internal_errors
        raise XsError("EINVAL", f"unsupported control command {parts[0][:32]!r}")
