"""Rules of xenstored that a one-line change would break without the older tests noticing (issue 18):
the node quota when a write creates missing parents, the permission RM needs (WRITE on the node, READ on the
parent of a missing node), and DIRECTORY_PART's byte accounting at the end of the child list
(reference xen-abi.md §1; C xenstored core.c send_directory_part, do_rm, and domain.c's node quota)."""
from __future__ import annotations

import pytest

from xenpv.backends.xenstored.core import XenstoreCore
from xenpv.backends.xenstored.quotas import Quotas
from xenpv.xenabi.xs_wire import XENSTORE_PAYLOAD_MAX, XsdSockmsgType as T

from .peers import Peer, peer

GUEST = 3
HOME = f"/local/domain/{GUEST}"


def guest_home(core: XenstoreCore, *perms: str) -> Peer:
    """dom0 makes the guest's home, owned by the guest unless `perms` say otherwise; returns dom0."""
    d0 = Peer(core)
    d0.write(HOME, "")
    d0.set_perms(HOME, *(perms or (f"n{GUEST}",)))
    return d0


# ---- node quota when a write creates missing parents ------------------------------------------------

@pytest.fixture
def ten_nodes() -> XenstoreCore:
    core = XenstoreCore(Quotas(nodes=10))
    guest_home(core)
    return core


def test_every_missing_parent_counts_against_the_node_quota(ten_nodes: XenstoreCore) -> None:
    g = peer(ten_nodes, GUEST)
    tree = ten_nodes.tree
    g.write("a/b/c", "v")                      # three new nodes, all owned by the creator
    assert tree.count_owned(GUEST) == 4
    for i in range(5):
        g.write(f"x{i}", "")
    assert tree.count_owned(GUEST) == 9        # one node left
    # Two new nodes do not fit in one: refused whole, and no parent is left behind.
    assert g.err(T.WRITE, b"p/q\0v") == "ENOSPC"
    assert g.err(T.MKDIR, b"p/q\0") == "ENOSPC"
    assert f"{HOME}/p" not in tree.nodes and tree.count_owned(GUEST) == 9
    g.write("p", "")                           # the last one fits: the quota is a maximum, not a bound below it
    assert tree.count_owned(GUEST) == 10
    assert g.err(T.WRITE, b"z\0") == "ENOSPC"
    g.write("p", "rewritten")                  # rewriting an existing node creates nothing
    # dom0 has no quota; what it creates under the guest's home inherits the guest as owner and counts.
    Peer(ten_nodes).write(f"{HOME}/dom0/made/these", "")
    assert tree.count_owned(GUEST) == 13


def test_node_quota_with_parents_inside_a_transaction(ten_nodes: XenstoreCore) -> None:
    g = peer(ten_nodes, GUEST)
    for i in range(7):
        g.write(f"x{i}", "")
    tx = g.tx_start()
    assert g.err(T.WRITE, b"p/q/r\0v", tx) == "ENOSPC"   # 8 owned + 3 new > 10
    g.write("p/q", "v", tx)                              # 8 + 2 = 10 fits
    assert g.tx_end(tx) == "OK"
    assert ten_nodes.tree.count_owned(GUEST) == 10


# ---- RM: WRITE on an existing node, READ on the parent of a missing one ----------------------------

def test_rm_of_an_existing_node_needs_write_not_read(core: XenstoreCore) -> None:
    d0 = guest_home(core, "n0", f"r{GUEST}")
    d0.write(f"{HOME}/readable/child", "1")
    d0.set_perms(f"{HOME}/readable", "n0", f"r{GUEST}")
    d0.write(f"{HOME}/writable/child", "2")
    d0.set_perms(f"{HOME}/writable", "n0", f"w{GUEST}")
    g = peer(core, GUEST)
    assert g.read("readable") == b""               # a reader, not the owner
    assert g.err(T.RM, b"readable\0") == "EACCES"
    assert f"{HOME}/readable/child" in core.tree.nodes, "a reader must not remove a node"
    assert g.err(T.RM, f"{HOME}/readable\0".encode()) == "EACCES"
    assert g.err(T.READ, b"writable\0") == "EACCES"  # a writer that cannot read...
    g.rm("writable")                                 # ...may remove it, with its subtree
    assert f"{HOME}/writable" not in core.tree.nodes and f"{HOME}/writable/child" not in core.tree.nodes
    assert d0.directory(HOME) == ["readable"]


def test_rm_by_a_domain_with_no_access_to_the_node(core: XenstoreCore) -> None:
    d0 = guest_home(core, "n0", f"r{GUEST}")
    d0.write(f"{HOME}/closed", "")
    d0.set_perms(f"{HOME}/closed", "n0")
    d0.write(f"{HOME}/other", "")
    d0.set_perms(f"{HOME}/other", "n0", f"b{GUEST + 1}")
    g = peer(core, GUEST)
    assert g.err(T.RM, b"closed\0") == "EACCES"
    assert g.err(T.RM, b"other\0") == "EACCES"          # another domain's entry is not this one's
    assert {f"{HOME}/closed", f"{HOME}/other"} <= core.tree.nodes.keys()


def test_rm_of_a_missing_node_needs_read_on_its_parent(core: XenstoreCore) -> None:
    d0 = guest_home(core, "n0", f"r{GUEST}")
    d0.write(f"{HOME}/wonly", "")
    d0.set_perms(f"{HOME}/wonly", "n0", f"w{GUEST}")
    g = peer(core, GUEST)
    before = core.dump()
    g.rm("missing")                                       # parent readable: OK, and nothing changes
    assert g.err(T.RM, b"wonly/missing\0") == "EACCES"    # parent not readable: hidden, even if writable
    assert g.err(T.RM, b"missing/deeper\0") == "ENOENT"   # parent missing, grandparent readable
    d0.set_perms(HOME, "n0")
    assert g.err(T.RM, b"missing\0") == "EACCES"
    assert g.err(T.RM, b"missing/deeper\0") == "EACCES"   # nearest existing ancestor not readable
    assert core.dump() == {**before, HOME: (b"", "n0\0")}


def test_rm_inside_a_transaction_checks_the_same_permissions(core: XenstoreCore) -> None:
    d0 = guest_home(core, "n0", f"r{GUEST}")
    d0.write(f"{HOME}/node", "")
    g = peer(core, GUEST)
    tx = g.tx_start()
    assert g.err(T.RM, b"node\0", tx) == "EACCES"
    assert g.tx_end(tx) == "OK"
    assert f"{HOME}/node" in core.tree.nodes


# ---- DIRECTORY_PART at the end of the list ---------------------------------------------------------

GEN_DIGITS = 7


def _children_totalling(total: int, prefix: str = "c") -> list[str]:
    """Child names whose NUL-joined list (each name plus its NUL) is exactly `total` bytes."""
    sizes, left = [], total
    while left > 300:  # 200-byte entries, then one of 101..300 bytes: every name fits its "cNNNN" stem
        sizes.append(200)
        left -= 200
    sizes.append(left)
    names = [f"{prefix}{i:04d}".ljust(size - 1, "x") for i, size in enumerate(sizes)]
    assert sum(len(n) + 1 for n in names) == total
    return names


def _directory_part(d0: Peer, path: str, offset: int) -> tuple[bytes, bytes]:
    body = d0.ok(T.DIRECTORY_PART, f"{path}\0{offset}\0".encode())
    assert len(body) <= XENSTORE_PAYLOAD_MAX
    gen, rest = body.split(b"\0", 1)
    return gen, rest


def _page_all(d0: Peer, path: str) -> tuple[list[bytes], list[str]]:
    chunks: list[bytes] = []
    offset, names = 0, []
    while True:
        _, rest = _directory_part(d0, path, offset)
        chunks.append(rest)
        if rest == b"\0" or rest.endswith(b"\0\0"):
            names += [n.decode() for n in rest[:-1].split(b"\0")[:-1]]
            return chunks, names
        assert rest.endswith(b"\0") and len(chunks) < 10, rest[-20:]
        names += [n.decode() for n in rest.split(b"\0")[:-1]]
        offset += len(rest)


@pytest.mark.parametrize("excess", [-2, -1, 0, 1, 2, 40])
def test_directory_part_fills_each_reply_and_ends_the_list_once(core: XenstoreCore, excess: int) -> None:
    d0 = Peer(core)
    core.tree.gen = 10 ** (GEN_DIGITS - 1)  # generation numbers of a fixed width while the test writes
    room = XENSTORE_PAYLOAD_MAX - (GEN_DIGITS + 1) - 1  # core.c: maxlen = PAYLOAD_MAX - genlen - 1
    names = _children_totalling(room + excess)
    for n in names:
        d0.write(f"/dp/{n}", "")
    gen, _ = _directory_part(d0, "/dp", 0)
    assert len(gen) == GEN_DIGITS
    chunks, got = _page_all(d0, "/dp")
    assert got == names
    data = b"".join(n.encode() + b"\0" for n in names)
    if excess <= 0:
        # Everything fits: one reply, the list and its empty-string terminator, at most the whole payload.
        assert chunks == [data + b"\0"]
        assert len(gen) + 1 + len(chunks[0]) == XENSTORE_PAYLOAD_MAX + excess
    else:
        # The first reply takes every child that fits in `room` bytes, no terminator; the rest follows.
        first = chunks[0]
        assert not first.endswith(b"\0\0") and len(first) <= room
        assert len(first) + len(names[len(first.split(b"\0")) - 1]) + 1 > room, "a child that fit was left out"
        assert b"".join(chunks) == data + b"\0"


def test_directory_part_offset_at_and_past_the_end(core: XenstoreCore) -> None:
    d0 = Peer(core)
    for n in ("a", "bb", "ccc"):
        d0.write(f"/dp/{n}", "")
    size = len(b"a\0bb\0ccc\0")
    assert _directory_part(d0, "/dp", size)[1] == b"\0"
    assert _directory_part(d0, "/dp", size + 1)[1] == b"\0"
    assert _directory_part(d0, "/dp", size - 4)[1] == b"ccc\0\0"
    assert _directory_part(d0, "/dp", 2)[1] == b"bb\0ccc\0\0"
    empty_gen, empty = _directory_part(d0, "/dp/a", 0)
    assert empty == b"\0" and empty_gen.isdigit()


# ---- every argument of a multi-argument request is NUL-terminated ----------------------------------------

def test_a_last_argument_without_its_nul_is_einval(core: XenstoreCore) -> None:
    """C xenstored core.c get_strings counts only NUL-terminated strings, so WATCH, DIRECTORY_PART,
    SET_PERMS and the other multi-argument requests whose last string has no NUL have too few arguments:
    EINVAL, and nothing happens (no watch under a token cut short, no permissions changed)."""
    d0 = Peer(core)
    d0.write("/a", "v")
    assert d0.err(T.WATCH, b"/a\0tok") == "EINVAL"
    assert d0.err(T.DIRECTORY_PART, b"/\x000") == "EINVAL"
    assert d0.err(T.SET_PERMS, b"/a\0n0\0r1") == "EINVAL"
    assert d0.err(T.WATCH, b"") == "EINVAL"
    d0.write("/a", "again")
    assert d0.events == []  # no watch was registered
    assert d0.ok(T.GET_PERMS, b"/a\0") == b"n0\0"


# ---- special paths only where the request allows them, cached or not ------------------------------------

def test_a_special_path_named_before_is_still_einval_where_specials_are_not_allowed(core: XenstoreCore) -> None:
    """C xenstored core.c is_valid_nodename: a path must start with '/' or, only where the request allows
    special nodes (WATCH, UNWATCH, GET_PERMS, SET_PERMS: get_node_canonicalized(..., allow_special)), with '@'.
    The core remembers canonical paths per connection (core._path): a special path that GET_PERMS or WATCH
    put there must not make READ, WRITE, MKDIR or RM of the same bytes valid on that connection."""
    for who in (Peer(core), peer(core, GUEST)):
        assert who.get_perms("@releaseDomain") == ["n0", "r32757"]   # allowed here, and now remembered
        who.watch("@introduceDomain", "t")
        for mtype, payload in ((T.READ, b"@releaseDomain\0"), (T.WRITE, b"@releaseDomain\0v"),
                               (T.MKDIR, b"@introduceDomain\0"), (T.RM, b"@introduceDomain\0"),
                               (T.DIRECTORY, b"@releaseDomain\0")):
            assert who.err(mtype, payload) == "EINVAL", (who.domid, mtype, payload)
        assert who.get_perms("@releaseDomain") == ["n0", "r32757"]   # still special where allowed
    assert not any(p.startswith("@") for p in core.tree.nodes), "a special path became a node"
    assert not any(c.startswith("@") for c in core.tree.nodes["/"].children)


# ---- internal errors: every one is counted -----------------------------------------------------------

def test_every_internal_error_is_counted(core: XenstoreCore) -> None:
    """core.py's contract with the fuzzers (module docstring): each exception no rule raised is answered EIO
    (as C xenstored core.c answers a request that failed internally) and counted, so `XS_CONTROL
    internal-errors` says how many defects a run hit, not just whether one did."""
    g = peer(core, GUEST)

    def broken(conn: object, tx: object, payload: bytes) -> bytes:
        raise KeyError("injected defect")

    core.handlers[int(T.READ)] = broken
    for n in (1, 2, 3):
        assert g.err(T.READ, b"x\0") == "EIO"
        assert core.internal_errors == n
    assert Peer(core).ok(T.CONTROL, b"internal-errors\0") == b"3\0"


# ---- dom0's transactions: no node quota, but a bounded snapshot ---------------------------------------

def test_dom0_transactions_are_not_held_to_the_guest_snapshot_quota_but_are_bounded() -> None:
    """Quotas apply to unprivileged domains only (C xenstored domain.c domain_is_unprivileged, quotas[]), so
    dom0's transaction keeps its snapshot past `transaction_nodes` pre-images where a guest's is doomed to
    EAGAIN. Its memory is still bounded: core._PRIV_PRESERVE_LIMIT, 1 Mi pre-images (xenstored/transactions.py
    module docstring). Reaching that bound for real takes 2 Mi requests (about 20 s and hundreds of MB),
    too slow for the unit suite, so the bound is read where the core hands it to the transaction."""
    core = XenstoreCore(Quotas(transaction_nodes=4))
    d0 = guest_home(core)
    g = peer(core, GUEST)
    for i in range(10):
        d0.write(f"{HOME}/n{i}", "old")
    tx0, txg = d0.tx_start(), g.tx_start()
    assert core.tree.open_txs == {d0.conn.transactions[tx0], g.conn.transactions[txg]}
    assert d0.conn.transactions[tx0].preserve_limit == 1 << 20
    assert g.conn.transactions[txg].preserve_limit == 4
    for i in range(10):  # ten nodes change under both open transactions: ten pre-images each
        d0.write(f"{HOME}/n{i}", "new")
    d0.write("/dom0-only", "x", tx0)
    g.write("mine", "x", txg)
    assert g.tx_end(txg) == "EAGAIN"   # its snapshot overflowed its quota
    assert d0.tx_end(tx0) == "OK"      # dom0 kept all ten
    assert d0.read("/dom0-only") == b"x"


# ---- node size: value, 8 bytes a permission, each child's name and NUL ------------------------------------

def test_node_size_counts_the_value_8_bytes_a_permission_and_each_child_name() -> None:
    """The node-size quota (C xenstored domain.c quotas[], reference xen-abi.md: node-size 2048 counting
    header, permissions at 8 bytes each (struct xs_permissions), data and the children's names with their
    NULs) applies to guests' nodes; here, exactly at the quota is accepted and one byte more is ENOSPC, for a
    node with one permission, with three, and with children."""
    core = XenstoreCore(Quotas(node_size=100))
    d0 = guest_home(core)
    g = peer(core, GUEST)
    d0.write(f"{HOME}/dom0", b"x" * 4000)                       # quotas bind guests only: dom0 writes and
    d0.set_perms(f"{HOME}/dom0", "n0", f"r{GUEST}", "r5")       # sets permissions on a node of any size
    g.write("one", b"x" * 92)                                   # 92 + 8 * 1 = 100
    assert g.err(T.WRITE, b"one\0" + b"x" * 93) == "ENOSPC"
    assert g.err(T.SET_PERMS, f"one\0n{GUEST}\0r0\0r5\0".encode()) == "ENOSPC"   # 92 + 8 * 3 = 116
    g.write("one", b"x" * 76)
    g.set_perms("one", f"n{GUEST}", "r0", "r5")                 # 76 + 24 = 100
    assert g.err(T.WRITE, b"one\0" + b"x" * 77) == "ENOSPC"
    assert g.err(T.SET_PERMS, f"one\0n{GUEST}\0r0\0r5\0r6\0".encode()) == "ENOSPC"   # 76 + 32
    g.write("dir", b"x" * 80)
    g.write("dir/ab", "")                                       # the parent's size becomes 80 + 8 + 3 = 91
    g.write("dir", b"x" * 89)                                   # 89 + 8 + 3 = 100
    assert g.err(T.WRITE, b"dir\0" + b"x" * 90) == "ENOSPC"
    assert g.read("one") == b"x" * 76 and g.read("dir") == b"x" * 89


# ---- transaction-nodes: the nodes a write would create count before it creates them ------------------------

def test_a_guest_write_in_a_transaction_counts_the_parents_it_would_create() -> None:
    """The transaction-nodes quota (C xenstored domain.c quotas[] ACC_TRANSNODES, 1024 by default; reference
    xen-abi.md) bounds the nodes a guest's transaction holds. A write that creates missing parents needs room
    for all of them: refused whole with ENOSPC (not half made, the transaction still usable), while a write
    that fits goes through; dom0 is not limited."""
    core = XenstoreCore(Quotas(transaction_nodes=4))
    d0 = guest_home(core)
    g = peer(core, GUEST)
    tx = g.tx_start()
    assert g.err(T.WRITE, b"a/b/c\0v", tx) == "ENOSPC"
    assert g.err(T.MKDIR, b"a/b/c\0", tx) == "ENOSPC"
    assert g.tx_end(tx) == "OK"                  # nothing was made
    tx = g.tx_start()
    g.write("a", "v", tx)                        # what it reads (a, its parent) and one new node: fits in 4
    assert g.tx_end(tx) == "OK"
    assert g.read("a") == b"v" and f"{HOME}/a/b" not in core.tree.nodes
    tx0 = d0.tx_start()
    d0.write(f"{HOME}/x/y/z/w", "v", tx0)
    assert d0.tx_end(tx0) == "OK"


# ---- watch events: a node the watcher cannot read is seen through a readable parent -------------------------

def test_a_change_to_a_node_the_watcher_cannot_read_is_seen_through_its_readable_parent(core: XenstoreCore) -> None:
    """C xenstored watch_permitted (xenstored_watch.c): an unprivileged watcher gets the event of a node it may
    not read when it may read the node's parent, so WRITE and SET_PERMS events carry the parent's permissions
    too. A node the watcher can read through neither (its parent closed as well) is not told."""
    d0 = guest_home(core)                              # the guest owns its home
    d0.write(f"{HOME}/secret", "")
    d0.set_perms(f"{HOME}/secret", "n0")               # dom0's, nobody else may read it
    d0.write(f"{HOME}/closed/inner", "")
    d0.set_perms(f"{HOME}/closed", "n0")
    d0.set_perms(f"{HOME}/closed/inner", "n0")
    g = peer(core, GUEST)
    assert g.err(T.READ, b"secret\0") == "EACCES"
    g.watch(HOME, "home")
    assert g.take_events() == [(HOME, "home")]
    d0.write(f"{HOME}/secret", "v")
    assert g.take_events() == [(f"{HOME}/secret", "home")]
    d0.set_perms(f"{HOME}/secret", "n0", "n5")
    assert g.take_events() == [(f"{HOME}/secret", "home")]
    d0.write(f"{HOME}/closed/inner", "v")               # neither the node nor its parent is readable
    d0.set_perms(f"{HOME}/closed/inner", "n0", "n5")
    assert g.take_events() == []


def test_a_committed_transaction_fires_watches_set_after_its_writes() -> None:
    """C xenstored fires a transaction's changes when it commits (transaction.c do_transaction_end ->
    fire_watches), against the watches that exist then: a watch registered after the write inside the
    transaction, but before the commit, still gets the event; an aborted transaction fires nothing."""
    core = XenstoreCore()
    writer, watcher = Peer(core), Peer(core)
    for commit, path in ((True, "/committed"), (False, "/aborted")):
        tx = writer.tx_start()
        writer.write(path, "v", tx)                  # no watch exists yet
        writer.mkdir(path + "/dir", tx)
        watcher.watch(path, "tok")
        assert watcher.take_events() == [(path, "tok")]   # the initial event only
        assert writer.tx_end(tx, commit) == "OK"
        want = [(path, "tok"), (path + "/dir", "tok")] if commit else []
        assert sorted(watcher.take_events()) == want


def test_a_guest_reads_a_special_nodes_permissions_only_where_they_let_it_read() -> None:
    """C xenstored do_get_perms on a special node (@introduceDomain, @releaseDomain): an unprivileged domain
    needs READ in the node's permissions like on any node; @releaseDomain grants it to every domain
    (DOMID_ANY) by default, @introduceDomain to none, and dom0 may change that with SET_PERMS."""
    core = XenstoreCore()
    d0, g = Peer(core), peer(core, GUEST)
    assert g.get_perms("@releaseDomain") == ["n0", "r32757"]
    assert g.err(T.GET_PERMS, b"@introduceDomain\0") == "EACCES"
    d0.set_perms("@introduceDomain", "n0", f"r{GUEST}")
    assert g.get_perms("@introduceDomain") == ["n0", f"r{GUEST}"]
    assert peer(core, GUEST + 1).err(T.GET_PERMS, b"@introduceDomain\0") == "EACCES"


def test_set_perms_bounds_the_permission_count_and_guards_special_nodes() -> None:
    """C xenstored do_set_perms: an unprivileged domain may set at most quota node_perms (5 by default)
    permissions on its node, ENOSPC beyond; this daemon takes at most 4096 in one request, EINVAL beyond, for
    dom0 too (a 4096-byte wire payload cannot carry that many anyway); a special node's permissions are dom0's to set (EACCES for a guest) and only the two that exist can
    be set (ENOENT)."""
    core = XenstoreCore()
    d0 = guest_home(core)
    g = peer(core, GUEST)
    five = [f"n{GUEST}", "r1", "r2", "r4", "r5"]
    g.write("node", "")
    g.set_perms("node", *five)
    assert g.get_perms("node") == five
    assert g.err(T.SET_PERMS, ("node\0" + "\0".join(five + ["r6"]) + "\0").encode()) == "ENOSPC"
    many = [f"n{GUEST}"] + [f"r{d}" for d in range(1, 4096)]
    d0.set_perms(f"{HOME}/node", *many)                          # 4096: the most a request carries
    assert len(core.tree.nodes[f"{HOME}/node"].perms) == 4096       # (too many to read back in one reply)
    assert d0.err(T.SET_PERMS, (f"{HOME}/node\0" + "\0".join(many + ["r4097"]) + "\0").encode()) == "EINVAL"
    assert g.err(T.SET_PERMS, b"@releaseDomain\0n0\0") == "EACCES"
    assert d0.err(T.SET_PERMS, b"@otherDomain\0n0\0") == "ENOENT"


def test_directory_part_takes_exactly_a_path_and_an_offset(core: XenstoreCore) -> None:
    """C xenstored send_directory_part: get_strings(in, vec, 2) != 2 is EINVAL: a third argument is refused
    with EINVAL like a missing one (not an internal error)."""
    d0 = Peer(core)
    d0.write("/dir/a", "")
    assert d0.err(T.DIRECTORY_PART, b"/dir\0") == "EINVAL"
    assert d0.err(T.DIRECTORY_PART, b"/dir\x000\0extra\0") == "EINVAL"
    assert core.internal_errors == 0


def test_a_relative_watch_gets_relative_events_whatever_its_first_letter_and_specials_can_be_unwatched() -> None:
    """C xenstored do_watch: a watch set with a relative path (not starting with '/' or '@') gets its events
    relative to the connection's home, whatever letter the path starts with; do_unwatch takes special paths
    (@releaseDomain) as WATCH does."""
    core = XenstoreCore()
    d0 = guest_home(core)
    g = peer(core, GUEST)
    for name in ("Xdev", "dev", "_u"):
        g.watch(name, "t")
        assert g.take_events() == [(name, "t")]
        d0.write(f"{HOME}/{name}", "1")
        assert g.take_events() == [(name, "t")]
    g.watch("@releaseDomain", "r")
    assert g.take_events() == [("@releaseDomain", "r")]
    assert g.ok(T.UNWATCH, b"@releaseDomain\0r\0") == b"OK\0"
    assert g.unwatch_err("@releaseDomain", "r") == "ENOENT"


# ---- transaction ids -----------------------------------------------------------------------------------

def test_transaction_ids_count_up_wrap_past_zero_and_skip_those_in_use() -> None:
    """A connection's transaction ids are 32-bit, never 0 (0 means "no transaction" on the wire), handed out
    in order, and never one still open on that connection (C xenstored's transaction_start)."""
    core = XenstoreCore(Quotas())
    d0 = Peer(core)

    def start() -> int:
        return int(d0.ok(T.TRANSACTION_START, b"\0").rstrip(b"\0"))

    assert [start(), start()] == [1, 2]
    d0.conn.next_txid = 0xFFFFFFFE
    assert [start(), start()] == [0xFFFFFFFE, 0xFFFFFFFF]
    # Past 0xFFFFFFFF comes 0, which is skipped, then 1 and 2, both still open: 3.
    assert start() == 3
    assert start() == 4
    assert d0.conn.next_txid == 5


# ---- dom0's domain operations -----------------------------------------------------------------------------

class RecordingAttacher:
    """The core's seam to the ring transport (daemon.py's real one maps the page and binds the port):
    records what the core asks of it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def attach(self, domid: int, gfn: int, port: int):  # type: ignore[no-untyped-def]
        self.calls.append(("attach", domid, gfn, port))
        return None

    def rebind(self, conn, port: int) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("rebind", conn.name, port))

    def detach(self, conn) -> None:  # type: ignore[no-untyped-def]
        self.calls.append(("detach", conn.name))


def test_introduce_takes_exactly_three_arguments_and_bounds_the_port_and_domid() -> None:
    from xenpv.xenabi.event_channel import DOMID_FIRST_RESERVED
    core = XenstoreCore(Quotas())
    d0 = Peer(core)
    assert d0.err(T.INTRODUCE, b"5\x004660\x009\x00extra\0") == "EINVAL"
    assert d0.err(T.INTRODUCE, b"5\x004660\0") == "EINVAL"
    assert d0.err(T.INTRODUCE, b"5\x004660\x000\0") == "EINVAL"                       # port 0
    assert d0.err(T.INTRODUCE, b"5\x004660\x004294967296\0") == "EINVAL"              # beyond 32 bits
    assert d0.err(T.INTRODUCE, b"%d\x004660\x009\0" % DOMID_FIRST_RESERVED) == "EINVAL"
    assert core.domains == {}
    d0.ok(T.INTRODUCE, b"%d\x004660\x004294967295\0" % (DOMID_FIRST_RESERVED - 1))
    d0.ok(T.INTRODUCE, b"5\x004660\x009\0")
    dom = core.domains[5]
    assert (dom.domid, dom.gfn, dom.port) == (5, 4660, 9)


def test_introduce_again_moves_the_port_and_rebinds_only_a_connected_ring() -> None:
    attacher = RecordingAttacher()
    core = XenstoreCore(Quotas(), attacher)
    d0 = Peer(core)
    d0.ok(T.INTRODUCE, b"5\x004660\x009\0")
    assert attacher.calls == [("attach", 5, 4660, 9)]
    d0.ok(T.INTRODUCE, b"5\x004660\x0011\0")        # no connection yet: nothing to rebind
    assert core.domains[5].port == 11 and len(attacher.calls) == 1
    guest = peer(core, 5)
    core.domains[5].conn = guest.conn
    d0.ok(T.INTRODUCE, b"5\x004660\x0012\0")
    assert attacher.calls[1:] == [("rebind", guest.conn.name, 12)]
    # A core without a transport (unit tests, the socket-only daemon) keeps the port and asks nothing.
    bare = XenstoreCore(Quotas())
    b0 = Peer(bare)
    b0.ok(T.INTRODUCE, b"5\x004660\x009\0")
    bare.domains[5].conn = peer(bare, 5).conn
    b0.ok(T.INTRODUCE, b"5\x004660\x0013\0")
    assert bare.domains[5].port == 13


def test_release_drops_the_connection_and_detaches_it_from_the_transport() -> None:
    for attacher in (RecordingAttacher(), None):
        core = XenstoreCore(Quotas(), attacher)
        d0 = Peer(core)
        d0.ok(T.INTRODUCE, b"5\x004660\x009\0")
        guest = peer(core, 5)
        core.domains[5].conn = guest.conn
        d0.ok(T.RELEASE, b"5\0")
        assert 5 not in core.domains
        if attacher is not None:
            assert attacher.calls[-1] == ("detach", guest.conn.name)
        assert d0.err(T.RELEASE, b"5\0") == "ENOENT"


def test_is_domain_introduced_is_true_for_dom0_and_self_and_introduced_domains_only() -> None:
    from xenpv.xenabi.event_channel import DOMID_SELF
    core = XenstoreCore(Quotas())
    d0 = Peer(core)
    assert d0.ok(T.IS_DOMAIN_INTRODUCED, b"0\0") == b"T\0"
    assert d0.ok(T.IS_DOMAIN_INTRODUCED, b"%d\0" % DOMID_SELF) == b"T\0"
    assert d0.ok(T.IS_DOMAIN_INTRODUCED, b"1\0") == b"F\0"
    d0.ok(T.INTRODUCE, b"1\x004660\x009\0")
    assert d0.ok(T.IS_DOMAIN_INTRODUCED, b"1\0") == b"T\0"


def test_resume_and_set_target_need_an_introduced_domain_and_their_own_arity() -> None:
    core = XenstoreCore(Quotas())
    d0 = Peer(core)
    assert d0.err(T.RESUME, b"5\0") == "ENOENT"
    assert d0.err(T.SET_TARGET, b"5\x006\0") == "ENOENT"
    d0.ok(T.INTRODUCE, b"5\x004660\x009\0")
    guest = peer(core, 5)
    core.domains[5].conn = guest.conn
    assert d0.err(T.SET_TARGET, b"5\x006\x007\0") == "EINVAL"
    d0.ok(T.SET_TARGET, b"5\x006\0")
    assert guest.conn.target == 6


def test_get_feature_of_a_domain_is_dom0s_question_about_an_introduced_one() -> None:
    core = XenstoreCore(Quotas())
    d0 = Peer(core)
    features = d0.ok(T.GET_FEATURE, b"")
    assert d0.ok(T.GET_FEATURE, b"0\0") == features
    assert d0.err(T.GET_FEATURE, b"5\0") == "ENOENT"
    d0.ok(T.INTRODUCE, b"5\x004660\x009\0")
    assert d0.ok(T.GET_FEATURE, b"5\0") == features
    guest = peer(core, 5)
    assert guest.ok(T.GET_FEATURE, b"") == features
    assert guest.err(T.GET_FEATURE, b"5\0") == "EACCES"


def test_control_knows_print_with_one_argument_and_internal_errors_with_none() -> None:
    core = XenstoreCore(Quotas())
    d0 = Peer(core)
    assert d0.ok(T.CONTROL, b"print\x00hello\0") == b"OK\0"
    assert d0.ok(T.CONTROL, b"internal-errors\0") == b"0\0"
    for bad in (b"print\0", b"print\x00a\x00b\0", b"internal-errors\x00x\0", b"log\x00x\0", b"nosuch\0"):
        assert d0.err(T.CONTROL, bad) == "EINVAL", bad


# ---- SET_PERMS' permission syntax (C strtol base 0 over the whole domid) -----------------------------------

@pytest.mark.parametrize("raw, domid", [(b"r65535", 0xFFFF), (b"w0", 0), (b"n0x1f", 31), (b"b0X1F", 31),
                                        (b"r010", 8), (b"r07", 7), (b"r9", 9)])
def test_a_permission_domid_is_strtol_base_0_up_to_65535(raw: bytes, domid: int) -> None:
    from xenpv.backends.xenstored.perms import parse_perm
    assert parse_perm(raw).domid == domid


@pytest.mark.parametrize("raw", [b"r65536", b"r08", b"r0x", b"r-1", b"r", b"x5", b"r5a"])
def test_a_permission_that_strtol_would_not_read_whole_is_einval(raw: bytes) -> None:
    from xenpv.backends.xenstored.errors import XsError
    from xenpv.backends.xenstored.perms import parse_perm
    with pytest.raises(XsError) as err:
        parse_perm(raw)
    assert err.value.errno_name == "EINVAL"


# ---- quotas: C xenstored's defaults, and the node count inside a transaction ------------------------------

def test_the_default_quotas_are_c_xenstoreds() -> None:
    """domain.c quotas[] (reference xen-abi.md §1): what an unprivileged domain may use by default."""
    q = Quotas()
    assert (q.nodes, q.watches, q.outstanding, q.transactions, q.transaction_nodes, q.node_perms, q.path_max,
            q.node_size) == (1000, 128, 20, 10, 1024, 5, 2048, 2048)


def test_a_transaction_counts_the_nodes_it_removes_and_gives_away(ten_nodes: XenstoreCore) -> None:
    """Inside a transaction the node quota sees the transaction's own changes: a removed node frees its
    place, a node whose owner dom0 changes counts for the new owner, and a rewritten node counts once."""
    g = peer(ten_nodes, GUEST)
    d0 = Peer(ten_nodes)
    for name in ("a", "b", "c"):
        g.write(name, "")
    assert ten_nodes.tree.count_owned(GUEST) == 4
    txid = int(g.ok(T.TRANSACTION_START, b"\0").rstrip(b"\0"))
    tx = g.conn.transactions[txid]
    g.write("a", "rewritten", tx=txid)
    assert tx.count_owned(GUEST) == 4
    g.rm("a", tx=txid)
    g.rm("b", tx=txid)
    assert tx.count_owned(GUEST) == 2
    for i in range(8):
        g.write(f"x{i}", "", tx=txid)
    assert tx.count_owned(GUEST) == 10
    assert g.err(T.WRITE, b"%s/y\0" % HOME.encode(), tx=txid) == "ENOSPC"
    # dom0 gives a guest node to dom0 inside its own transaction: one fewer for the guest there.
    t0 = int(d0.ok(T.TRANSACTION_START, b"\0").rstrip(b"\0"))
    d0.ok(T.SET_PERMS, f"{HOME}/c\0n0\0".encode(), tx=t0)
    tx0 = d0.conn.transactions[t0]
    assert (tx0.count_owned(GUEST), tx0.count_owned(0)) == (3, ten_nodes.tree.count_owned(0) + 1)


def test_a_transaction_keeps_at_most_its_preserve_limit_of_old_nodes() -> None:
    """Transaction.preserve: the limit is how many old nodes it keeps; the one after them dooms it."""
    from xenpv.backends.xenstored.transactions import Transaction
    from xenpv.backends.xenstored.tree import Tree
    tx = Transaction(Tree(), 1, preserve_limit=2)
    tx.preserve("/a", None)
    tx.preserve("/b", None)
    assert not tx.overflowed and not tx.stale and set(tx.preserved) == {"/a", "/b"}
    tx.preserve("/c", None)
    assert tx.overflowed and tx.stale and tx.preserved == {}


# ---- SET_TARGET: a connection acting for its target domain ------------------------------------------------

def test_a_target_gives_the_targets_access_and_no_more() -> None:
    """perms.c: a domain with a target (a device model's stubdom) has the target's rights on a node: the
    owner's if the target owns it, the target's entry otherwise; without a target, only its own."""
    from xenpv.backends.xenstored.perms import Access, Perm, access_for
    owned_by_target = (Perm(7, Access.NONE),)
    entry_for_target = (Perm(5, Access.NONE), Perm(7, Access.READ))
    assert access_for(owned_by_target, 9, 7) == Access.BOTH | Access.OWNER
    assert access_for(owned_by_target, 9, 8) == Access.NONE
    assert access_for(owned_by_target, 9, None) == Access.NONE
    assert access_for(entry_for_target, 9, 7) == Access.READ
    assert access_for(entry_for_target, 9, 8) == Access.NONE
    assert access_for(entry_for_target, 9, None) == Access.NONE


def test_directory_part_of_a_fresh_root_starts_with_a_decimal_generation() -> None:
    """The first field of every DIRECTORY_PART reply is the node's generation as a decimal number (libxenstore
    compares it between chunks), on a store that has seen nothing but its own start."""
    core = XenstoreCore(Quotas())
    reply = Peer(core).ok(T.DIRECTORY_PART, b"/\x000\0")
    gen, _, rest = reply.partition(b"\0")
    assert gen.isdigit(), reply


# ---- path syntax at its bounds (core.c canonicalize, is_valid_nodename) -----------------------------------

def test_path_lengths_are_refused_only_beyond_their_maximum() -> None:
    from xenpv.backends.xenstored.errors import XsError
    from xenpv.backends.xenstored.paths import canonicalize
    from xenpv.xenabi.xs_wire import XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX

    def refused(raw: bytes, **kw) -> bool:  # type: ignore[no-untyped-def]
        try:
            canonicalize(raw, "/h", **kw)
        except XsError:
            return True
        return False

    rel = b"a" * XENSTORE_REL_PATH_MAX
    assert not refused(rel) and refused(rel + b"a")
    special = b"@" + b"s" * (XENSTORE_REL_PATH_MAX - 1)
    assert not refused(special, allow_special=True) and refused(special + b"s", allow_special=True)
    absolute = b"/" + b"a" * (XENSTORE_ABS_PATH_MAX - 1)
    assert not refused(absolute) and refused(absolute + b"a")
    # The quota counts what follows /local/domain/N/, or the whole path elsewhere.
    assert not refused(b"/local/domain/7/" + b"q" * 10, path_quota=10)
    assert refused(b"/local/domain/7/" + b"q" * 11, path_quota=10)
    assert not refused(b"/" + b"q" * 9, path_quota=10) and refused(b"/" + b"q" * 10, path_quota=10)
    # Special paths only where the request allows them; "/" alone is the root, "/a/" a trailing slash.
    assert refused(b"@introduceDomain") and not refused(b"@introduceDomain", allow_special=True)
    assert not refused(b"/") and refused(b"/a/") and refused(b"ab/")


def test_parent_and_subtree_of_paths_near_the_root() -> None:
    from xenpv.backends.xenstored.paths import depth_below, is_at_or_below, parent_of
    assert (parent_of("/a"), parent_of("/a/b"), parent_of("/")) == ("/", "/a", "/")
    assert is_at_or_below("/x", "/") and is_at_or_below("/a/b", "/a") and not is_at_or_below("/ab", "/a")
    assert (depth_below("/a/b", "/"), depth_below("/a/b/c", "/a"), depth_below("/a", "/a")) == (2, 2, 0)
