"""The edge cases of reference §1, each on its own: payload formats, errors, paths, permissions, watches,
transactions, domains and quotas, against an in-process core."""
from __future__ import annotations

import pytest

from xenpv.backends.xenstored.core import SERVER_FEATURES, XenstoreCore
from xenpv.backends.xenstored.quotas import Quotas
from xenpv.xenabi.xs_wire import DOMID_ANY, XsdSockmsgType as T

from .peers import Peer, peer


# ---- message types and errors ----------------------------------------------------------------------

@pytest.mark.parametrize("mtype", [20, 24, 25, 26, 27, 99, 0xFFFF, T.WATCH_EVENT, T.ERROR])
def test_unknown_or_unsupported_type_is_enosys(dom0: Peer, mtype: int) -> None:
    assert dom0.err(mtype, b"x\0") == "ENOSYS"


@pytest.mark.parametrize("mtype", [T.CONTROL, T.INTRODUCE, T.RELEASE, T.IS_DOMAIN_INTRODUCED, T.RESUME,
                                   T.SET_TARGET, T.SET_FEATURE, T.GET_QUOTA, T.SET_QUOTA])
def test_privileged_types_refused_to_guests(core: XenstoreCore, mtype: int) -> None:
    assert peer(core, 3).err(mtype, b"1\0") == "EACCES"


def test_reply_echoes_ids_even_on_error(dom0: Peer) -> None:
    dom0.core.handle(dom0.conn, T.READ, 0xDEADBEEF, 0, b"/nope\0")
    assert dom0.out[0][:16] == bytes.fromhex("10000000efbeadde0000000007000000")
    assert dom0.out[0][16:] == b"ENOENT\0"


def test_success_without_data_is_ok_nul(dom0: Peer) -> None:
    assert dom0.ok(T.WRITE, b"/x\0v") == b"OK\0"


def test_foreign_transaction_id_is_enoent(core: XenstoreCore) -> None:
    a, b = Peer(core), Peer(core)
    tx = a.tx_start()
    assert b.err(T.READ, b"/tool\0", tx) == "ENOENT"
    assert b.err(T.WRITE, b"/x\0v", tx) == "ENOENT"
    assert a.read("/tool", tx) == b""


def test_watch_and_unwatch_ignore_tx_id(dom0: Peer) -> None:
    assert dom0.ok(T.WATCH, b"/w\0t\0", 12345) == b"OK\0"
    assert dom0.ok(T.UNWATCH, b"/w\0t\0", 12345) == b"OK\0"


# ---- payload formats -------------------------------------------------------------------------------

def test_read_returns_raw_value_without_nul(dom0: Peer) -> None:
    dom0.write("/k", b"v\0with\0nuls")
    assert dom0.read("/k") == b"v\0with\0nuls"


def test_write_without_nul_is_einval(dom0: Peer) -> None:
    assert dom0.err(T.WRITE, b"/k") == "EINVAL"


def test_write_empty_value(dom0: Peer) -> None:
    assert dom0.ok(T.WRITE, b"/k\0") == b"OK\0"
    assert dom0.read("/k") == b""


@pytest.mark.parametrize("payload", [b"/tool", b"", b"/tool\0extra\0", b"/tool\0x"])
def test_read_argument_must_be_one_nul_terminated_string(dom0: Peer, payload: bytes) -> None:
    assert dom0.err(T.READ, payload) == "EINVAL"


def test_write_creates_parents_with_empty_values(dom0: Peer) -> None:
    dom0.write("/a/b/c", "v")
    assert dom0.read("/a") == b"" and dom0.read("/a/b") == b""
    assert dom0.directory("/a") == ["b"]


def test_mkdir_existing_node_untouched_and_silent(dom0: Peer) -> None:
    dom0.write("/m", "keep")
    dom0.watch("/m", "t")
    dom0.take_events()
    dom0.mkdir("/m")
    assert dom0.read("/m") == b"keep"
    assert dom0.take_events() == []


def test_mkdir_creates_parents(dom0: Peer) -> None:
    dom0.mkdir("/p/q/r")
    assert dom0.directory("/p/q") == ["r"]


def test_rm_missing_child_of_existing_parent_is_ok(dom0: Peer) -> None:
    dom0.rm("/tool/nothing")


def test_rm_with_missing_parent_is_enoent(dom0: Peer) -> None:
    assert dom0.err(T.RM, b"/no/such\0") == "ENOENT"


def test_rm_root_is_einval(dom0: Peer) -> None:
    assert dom0.err(T.RM, b"/\0") == "EINVAL"


def test_rm_is_recursive(dom0: Peer) -> None:
    dom0.write("/r/a/b", "1")
    dom0.write("/r/c", "2")
    dom0.rm("/r")
    assert "/r/a/b" not in dom0.core.tree.nodes and "/r" not in dom0.core.tree.nodes
    assert dom0.core.tree.count_owned(0) == len(dom0.core.tree.nodes)


def test_directory_in_insertion_order_and_empty(dom0: Peer) -> None:
    for name in ("zeta", "alpha", "mid"):
        dom0.write(f"/d/{name}", "")
    assert dom0.ok(T.DIRECTORY, b"/d\0") == b"zeta\0alpha\0mid\0"
    assert dom0.ok(T.DIRECTORY, b"/d/zeta\0") == b""


def test_directory_too_big_is_e2big_and_directory_part_pages(dom0: Peer) -> None:
    names = [f"child-with-a-long-name-{i:04d}" for i in range(300)]
    for n in names:
        dom0.write(f"/big/{n}", "")
    assert dom0.err(T.DIRECTORY, b"/big\0") == "E2BIG"
    got: list[str] = []
    offset = 0
    gen = None
    while True:
        body = dom0.ok(T.DIRECTORY_PART, b"/big\0%d\0" % offset)
        assert len(body) <= 4096
        g, rest = body.split(b"\0", 1)
        gen = gen or g
        assert g == gen
        if rest == b"\0" or rest.endswith(b"\0\0"):
            got += [x.decode() for x in rest[:-1].split(b"\0")[:-1]]
            break
        got += [x.decode() for x in rest.split(b"\0")[:-1]]
        offset += len(rest)
    assert got == names


def test_directory_part_offset_past_end(dom0: Peer) -> None:
    dom0.write("/dp/a", "")
    body = dom0.ok(T.DIRECTORY_PART, b"/dp\x0099\0")
    g, rest = body.split(b"\0", 1)
    assert g.isdigit() and rest == b"\0"
    body = dom0.ok(T.DIRECTORY_PART, b"/dp\x000\0")
    assert body.split(b"\0", 1)[1] == b"a\0\0"


def test_get_feature(core: XenstoreCore) -> None:
    assert Peer(core).ok(T.GET_FEATURE, b"") == b"%d\0" % SERVER_FEATURES
    assert peer(core, 5).ok(T.GET_FEATURE, b"") == b"%d\0" % SERVER_FEATURES
    assert peer(core, 5).err(T.GET_FEATURE, b"0\0") == "EACCES"
    assert SERVER_FEATURES & 4 and SERVER_FEATURES & 8


def test_get_domain_path_any_caller(core: XenstoreCore) -> None:
    assert peer(core, 9).ok(T.GET_DOMAIN_PATH, b"42\0") == b"/local/domain/42\0"


@pytest.mark.parametrize("raw", [b"", b"-1", b"65536", b"1x", b" 1", b"0x10"])
def test_domid_parsing(dom0: Peer, raw: bytes) -> None:
    assert dom0.err(T.GET_DOMAIN_PATH, raw + b"\0") == "EINVAL"


# ---- paths -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [b"/a//b", b"/a/", b"/a b", b"/a.b", b"/\xff", b"@special", b"/a\tb",
                                  b"//", b"/a*"])
def test_bad_paths_are_einval(dom0: Peer, path: bytes) -> None:
    assert dom0.err(T.WRITE, path + b"\0v") == "EINVAL"
    assert dom0.err(T.READ, path + b"\0") == "EINVAL"


def test_valid_character_set(dom0: Peer) -> None:
    dom0.write("/Az09-_@/x@y", "ok")
    assert dom0.read("/Az09-_@/x@y") == b"ok"


def test_relative_path_resolves_to_caller_domain(core: XenstoreCore) -> None:
    Peer(core).write("/local/domain/4", "")
    Peer(core).set_perms("/local/domain/4", "n4")
    g = peer(core, 4)
    g.write("data/x", "1")
    assert Peer(core).read("/local/domain/4/data/x") == b"1"
    Peer(core).write("rel", "0")
    assert Peer(core).read("/local/domain/0/rel") == b"0"


def test_path_length_limits(dom0: Peer) -> None:
    long_abs = b"/" + b"a" * 3072
    assert dom0.err(T.WRITE, long_abs + b"\0v") == "EINVAL"
    ok_abs = b"/" + b"a/" * 1000 + b"b"
    assert dom0.ok(T.WRITE, ok_abs + b"\0v") == b"OK\0"
    assert dom0.err(T.READ, b"a" * 2049 + b"\0") == "EINVAL"


def test_guest_path_quota_counts_after_domain_prefix(core: XenstoreCore) -> None:
    Peer(core).write("/local/domain/4", "")
    Peer(core).set_perms("/local/domain/4", "n4")
    g = peer(core, 4)
    assert g.ok(T.WRITE, b"x" * 2048 + b"\0v") == b"OK\0"
    assert g.err(T.WRITE, b"y" * 2049 + b"\0v") == "EINVAL"


# ---- permissions -----------------------------------------------------------------------------------

def test_initial_tree_and_specials(dom0: Peer) -> None:
    assert dom0.directory("/") == ["tool"]
    assert dom0.directory("/tool") == ["xenstored"]
    assert dom0.get_perms("/tool/xenstored") == ["n0"]
    assert dom0.get_perms("@releaseDomain") == ["n0", f"r{DOMID_ANY}"]
    assert dom0.get_perms("@introduceDomain") == ["n0"]
    assert dom0.err(T.GET_PERMS, b"@other\0") == "ENOENT"


def test_owner_default_and_per_domain_entries(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.write("/p", "v")
    d0.set_perms("/p", "w5", "r6", "n7")
    owner5, reader6, none7, default8 = (peer(core, d) for d in (5, 6, 7, 8))
    assert owner5.read("/p") == b"v"  # the owner has full access whatever its letter says
    owner5.write("/p", "by5")
    assert reader6.read("/p") == b"by5"
    assert reader6.err(T.WRITE, b"/p\0x") == "EACCES"
    assert none7.err(T.READ, b"/p\0") == "EACCES"
    assert default8.err(T.READ, b"/p\0") == "EACCES"  # default = entry 0's letter: w
    default8.write("/p", "by8")


def test_first_matching_entry_wins(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.write("/p", "v")
    d0.set_perms("/p", "n0", "r5", "n5")
    assert peer(core, 5).read("/p") == b"v"


def test_domid_any_entry(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.write("/p", "v")
    d0.set_perms("/p", "n0", f"r{DOMID_ANY}")
    assert peer(core, 11).read("/p") == b"v"
    assert peer(core, 11).err(T.WRITE, b"/p\0x") == "EACCES"


def test_perm_domid_parsed_like_strtol_base0(dom0: Peer) -> None:
    dom0.write("/p", "")
    dom0.set_perms("/p", "n0", "r0x10", "b010")
    assert dom0.get_perms("/p") == ["n0", "r16", "b8"]


@pytest.mark.parametrize("perm", [b"x0", b"r", b"rabc", b"", b"r-1", b"r70000"])
def test_bad_permission_is_einval(dom0: Peer, perm: bytes) -> None:
    dom0.write("/p", "")
    assert dom0.err(T.SET_PERMS, b"/p\0" + perm + b"\0") == "EINVAL"


def test_set_perms_needs_at_least_one(dom0: Peer) -> None:
    dom0.write("/p", "")
    assert dom0.err(T.SET_PERMS, b"/p\0") == "EINVAL"


def test_errors_hide_existence(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.write("/secret/node", "v")
    g = peer(core, 3)
    assert g.err(T.READ, b"/secret/node\0") == "EACCES"
    assert g.err(T.READ, b"/secret/missing\0") == "EACCES", "ENOENT would reveal that /secret exists"
    d0.set_perms("/secret", "n0", "r3")
    assert g.err(T.READ, b"/secret/missing\0") == "ENOENT"


def test_new_nodes_inherit_and_creator_owns(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.write("/local/domain/3", "")
    d0.set_perms("/local/domain/3", "n3", "r0", "w9")
    g = peer(core, 3)
    g.write("a/b", "x")
    assert d0.get_perms("/local/domain/3/a/b") == ["n3", "r0", "w9"]
    d0.write("/local/domain/3/byzero", "")
    assert d0.get_perms("/local/domain/3/byzero") == ["n3", "r0", "w9"]
    d0.set_perms("/local/domain/3", "n0", "b3")
    g.write("c", "y")
    assert d0.get_perms("/local/domain/3/c") == ["n3", "b3"], "entry 0 becomes the unprivileged creator"


def test_only_owner_may_set_perms_and_not_change_owner(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.write("/p", "")
    d0.set_perms("/p", "n4", "b5")
    assert peer(core, 5).err(T.SET_PERMS, b"/p\0n5\0") == "EACCES"
    assert peer(core, 4).err(T.SET_PERMS, b"/p\0n6\0") == "EPERM"
    peer(core, 4).set_perms("/p", "r4", "b6")
    assert d0.get_perms("/p") == ["r4", "b6"]


def test_too_many_perms_for_a_guest_is_enospc(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.write("/p", "")
    d0.set_perms("/p", "n4")
    assert peer(core, 4).err(T.SET_PERMS, b"/p\0n4\0r1\0r2\0r3\0r5\0r6\0") == "ENOSPC"
    d0.set_perms("/p", "n4", "r1", "r2", "r3", "r5", "r6")


def test_set_target_lets_a_domain_act_for_another(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.write("/local/domain/7/x", "v")
    d0.set_perms("/local/domain/7/x", "n7")
    d0.ok(T.INTRODUCE, b"8\x001\x005\0")
    stub = peer(core, 8)
    core.domains[8].conn = stub.conn
    assert stub.err(T.READ, b"/local/domain/7/x\0") == "EACCES"
    d0.ok(T.SET_TARGET, b"8\x007\0")
    assert stub.read("/local/domain/7/x") == b"v"


# ---- watches ---------------------------------------------------------------------------------------

def test_watch_fires_immediately_with_path_as_given(dom0: Peer) -> None:
    dom0.watch("rel/path", "tok")
    dom0.watch("/abs/path", "tok")
    assert dom0.take_events() == [("rel/path", "tok"), ("/abs/path", "tok")]


def test_same_watch_twice_is_eexist(dom0: Peer) -> None:
    dom0.watch("/w", "t")
    assert dom0.err(T.WATCH, b"/w\0t\0") == "EEXIST"
    dom0.watch("/w", "other")


def test_relative_and_absolute_same_node_is_eexist(dom0: Peer) -> None:
    dom0.watch("/local/domain/0/x", "t")
    assert dom0.err(T.WATCH, b"x\0t\0") == "EEXIST"


def test_unwatch_unknown_is_enoent(dom0: Peer) -> None:
    assert dom0.unwatch_err("/w", "t") == "ENOENT"


def test_watch_subtree_matching(dom0: Peer) -> None:
    dom0.watch("/a", "A")
    dom0.watch("/", "ROOT")
    dom0.watch("/a/b/c/d", "BELOW")
    dom0.watch("/ab", "SIBLING")
    dom0.take_events()
    dom0.write("/a/b/c", "x")
    assert sorted(dom0.take_events()) == [("/a/b/c", "A"), ("/a/b/c", "ROOT")]


def test_watch_depth(dom0: Peer) -> None:
    dom0.watch("/d", "d0", depth=0)
    dom0.watch("/d", "d1", depth=1)
    dom0.watch("/", "r1", depth=1)
    dom0.take_events()
    dom0.write("/d", "")
    dom0.write("/d/x", "")
    dom0.write("/d/x/y", "")
    assert dom0.take_events() == [("/d", "d0"), ("/d", "d1"), ("/d", "r1"), ("/d/x", "d1")]


@pytest.mark.parametrize("depth", [b"-1", b"x", b""])
def test_bad_watch_depth_is_einval(dom0: Peer, depth: bytes) -> None:
    assert dom0.err(T.WATCH, b"/w\0t\0" + depth + b"\0") == "EINVAL"


def test_watch_needs_two_or_three_args(dom0: Peer) -> None:
    assert dom0.err(T.WATCH, b"/w\0") == "EINVAL"
    assert dom0.err(T.WATCH, b"/w\0t\x001\0x\0") == "EINVAL"


def test_relative_watch_gets_relative_event_paths(dom0: Peer) -> None:
    dom0.watch("dev", "t")
    dom0.take_events()
    dom0.write("/local/domain/0/dev/vbd", "")
    assert dom0.take_events() == [("dev/vbd", "t")]


def test_rm_fires_removed_descendants_exactly(dom0: Peer) -> None:
    dom0.write("/r/a/b", "")
    dom0.watch("/r/a/b", "leaf")
    dom0.watch("/r/a/none", "never")
    dom0.watch("/", "root")
    dom0.take_events()
    dom0.rm("/r/a")
    assert sorted(dom0.take_events()) == [("/r/a", "root"), ("/r/a/b", "leaf")]


def test_set_perms_fires(dom0: Peer) -> None:
    dom0.write("/s", "")
    dom0.watch("/s", "t")
    dom0.take_events()
    dom0.set_perms("/s", "n0", "r1")
    assert dom0.take_events() == [("/s", "t")]


def test_events_need_read_access(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.write("/priv/x", "")
    g = peer(core, 3)
    g.watch("/priv", "t")
    assert g.take_events() == [("/priv", "t")]
    d0.write("/priv/x", "changed")
    assert g.take_events() == []
    d0.set_perms("/priv/x", "n0", "r3")
    d0.write("/priv/x", "again")
    assert g.take_events() == [("/priv/x", "t"), ("/priv/x", "t")]


def test_watch_events_after_reply(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.watch("/o", "t")
    d0.out.clear()
    d0.events.clear()
    core.handle(d0.conn, T.WRITE, 1, 0, b"/o\0v")
    assert [m[:4] for m in d0.out] == [T.WRITE.to_bytes(4, "little"), T.WATCH_EVENT.to_bytes(4, "little")]


def test_reset_watches_drops_watches_and_transactions(dom0: Peer) -> None:
    dom0.watch("/w", "t")
    tx = dom0.tx_start()
    assert dom0.ok(T.RESET_WATCHES, b"\0") == b"OK\0"
    dom0.take_events()
    dom0.write("/w", "")
    assert dom0.take_events() == []
    assert dom0.err(T.READ, b"/tool\0", tx) == "ENOENT"


def test_oversize_event_dropped(dom0: Peer) -> None:
    token = "t" * 3000
    dom0.watch("/", token)
    dom0.take_events()
    dom0.write("/" + "a/" * 600 + "b", "")
    assert dom0.take_events() == []


# ---- transactions ----------------------------------------------------------------------------------

def test_transaction_ids_start_at_one_per_connection(core: XenstoreCore) -> None:
    a, b = Peer(core), Peer(core)
    assert a.tx_start() == 1 and a.tx_start() == 2 and b.tx_start() == 1


def test_transaction_start_inside_transaction_is_ebusy(dom0: Peer) -> None:
    tx = dom0.tx_start()
    assert dom0.err(T.TRANSACTION_START, b"\0", tx) == "EBUSY"


def test_transaction_end_errors(dom0: Peer) -> None:
    assert dom0.err(T.TRANSACTION_END, b"T\0") == "ENOENT"
    tx = dom0.tx_start()
    assert dom0.err(T.TRANSACTION_END, b"X\0", tx) == "EINVAL"
    assert dom0.tx_end(tx) == "OK"
    assert dom0.err(T.TRANSACTION_END, b"T\0", tx) == "ENOENT", "the id is gone after END"


def test_disjoint_transactions_both_commit(core: XenstoreCore) -> None:
    a, b = Peer(core), Peer(core)
    a.write("/x/a", "0")
    b.write("/y/b", "0")
    ta, tb = a.tx_start(), b.tx_start()
    a.write("/x/a", "1", ta)
    b.write("/y/b", "1", tb)
    assert a.tx_end(ta) == "OK" and b.tx_end(tb) == "OK"


def test_lookup_of_missing_node_conflicts_when_created(core: XenstoreCore) -> None:
    a, b = Peer(core), Peer(core)
    tx = a.tx_start()
    assert a.err(T.READ, b"/later\0", tx) == "ENOENT"
    b.write("/later", "now")
    a.write("/other", "", tx)
    assert a.tx_end(tx) == "EAGAIN"


def test_conflicting_commits_only_first_wins(core: XenstoreCore) -> None:
    a, b = Peer(core), Peer(core)
    a.write("/c", "0")
    ta, tb = a.tx_start(), b.tx_start()
    a.write("/c", "a", ta)
    b.write("/c", "b", tb)
    assert a.tx_end(ta) == "OK"
    assert b.tx_end(tb) == "EAGAIN"
    assert a.read("/c") == b"a"


# ---- domains ---------------------------------------------------------------------------------------

def test_introduce_release_and_special_events(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.watch("@introduceDomain", "intro")
    d0.watch("@releaseDomain", "rel")
    d0.watch("@releaseDomain", "reldepth", depth=1)
    d0.take_events()
    assert d0.ok(T.IS_DOMAIN_INTRODUCED, b"5\0") == b"F\0"
    d0.ok(T.INTRODUCE, b"5\x00123\x007\0")
    assert d0.take_events() == [("@introduceDomain", "intro")]
    assert d0.ok(T.IS_DOMAIN_INTRODUCED, b"5\0") == b"T\0"
    assert d0.ok(T.IS_DOMAIN_INTRODUCED, b"32752\0") == b"T\0", "DOMID_SELF"
    d0.ok(T.RELEASE, b"5\0")
    assert d0.take_events() == [("@releaseDomain", "rel"), ("@releaseDomain/5", "reldepth")]
    assert d0.ok(T.IS_DOMAIN_INTRODUCED, b"5\0") == b"F\0"


def test_release_domain_specific_watch(core: XenstoreCore) -> None:
    d0 = Peer(core)
    d0.ok(T.INTRODUCE, b"5\x001\x007\0")
    d0.ok(T.INTRODUCE, b"6\x001\x007\0")
    d0.watch("@releaseDomain/6", "six")
    d0.take_events()
    d0.ok(T.RELEASE, b"5\0")
    assert d0.take_events() == []
    d0.ok(T.RELEASE, b"6\0")
    assert d0.take_events() == [("@releaseDomain/6", "six")]


def test_guest_may_watch_release_domain_but_not_introduce(core: XenstoreCore) -> None:
    d0, g = Peer(core), peer(core, 3)
    g.watch("@releaseDomain", "r")
    g.watch("@introduceDomain", "i")
    g.take_events()
    d0.ok(T.INTRODUCE, b"5\x001\x007\0")
    d0.ok(T.RELEASE, b"5\0")
    assert g.take_events() == [("@releaseDomain", "r")]


def test_introduce_errors(dom0: Peer) -> None:
    assert dom0.err(T.INTRODUCE, b"5\x001\x000\0") == "EINVAL"
    assert dom0.err(T.INTRODUCE, b"5\x001\0") == "EINVAL"
    assert dom0.err(T.RELEASE, b"77\0") == "ENOENT"
    assert dom0.err(T.RESUME, b"77\0") == "ENOENT"


def test_reintroduce_only_rebinds(dom0: Peer) -> None:
    dom0.watch("@introduceDomain", "i")
    dom0.ok(T.INTRODUCE, b"5\x001\x007\0")
    dom0.ok(T.INTRODUCE, b"5\x001\x009\0")
    assert dom0.take_events() == [("@introduceDomain", "i"), ("@introduceDomain", "i")]
    assert dom0.core.domains[5].port == 9


def test_resume(dom0: Peer) -> None:
    dom0.ok(T.INTRODUCE, b"5\x001\x007\0")
    dom0.core.domains[5].shutdown = True
    dom0.ok(T.RESUME, b"5\0")
    assert not dom0.core.domains[5].shutdown


# ---- quotas ----------------------------------------------------------------------------------------

@pytest.fixture
def small_core() -> XenstoreCore:
    core = XenstoreCore(Quotas(nodes=20, watches=4, transactions=2, node_size=100))
    Peer(core).write("/local/domain/3", "")
    Peer(core).set_perms("/local/domain/3", "n3")
    return core


def test_node_quota(small_core: XenstoreCore) -> None:
    g = peer(small_core, 3)
    errors = [g.call(T.WRITE, b"n%d\0v" % i)[1] for i in range(30)]
    assert errors.count(b"ENOSPC\0") == 11  # /local/domain/3 itself is owned by dom3
    g.rm("n0")
    g.write("again", "v")


def test_watch_quota(small_core: XenstoreCore) -> None:
    g = peer(small_core, 3)
    for i in range(4):
        g.watch(f"w{i}", "t")
    assert g.err(T.WATCH, b"w9\0t\0") == "ENOSPC"
    Peer(small_core).watch("/w9", "t")  # dom0 is not limited


def test_transaction_quota(small_core: XenstoreCore) -> None:
    g = peer(small_core, 3)
    g.tx_start(), g.tx_start()
    assert g.err(T.TRANSACTION_START, b"\0") == "ENOSPC"


def test_node_size_quota(small_core: XenstoreCore) -> None:
    g = peer(small_core, 3)
    assert g.err(T.WRITE, b"big\0" + b"x" * 200) == "ENOSPC"
    g.write("small", "x" * 50)
    assert g.err(T.WRITE, b"small\0" + b"x" * 200) == "ENOSPC"
    assert g.read("small") == b"x" * 50
    Peer(small_core).write("/local/domain/3/big", "x" * 4000)


def test_default_quotas_match_cxenstored() -> None:
    q = Quotas()
    assert (q.nodes, q.watches, q.outstanding, q.transactions, q.node_perms, q.path_max, q.node_size) == \
        (1000, 128, 20, 10, 5, 2048, 2048)


def test_snapshot_hides_nodes_created_after_start(core: XenstoreCore) -> None:
    a, b = Peer(core), Peer(core)
    tx = a.tx_start()
    b.write("/new/node", "v")
    b.rm("/tool/xenstored")
    assert a.err(T.READ, b"/new\0", tx) == "ENOENT"
    assert a.directory("/tool", tx) == ["xenstored"]
    assert a.tx_end(tx) == "EAGAIN"


def test_transaction_snapshot_is_bounded(small_core: XenstoreCore) -> None:
    core = XenstoreCore(Quotas(transaction_nodes=3))
    Peer(core).write("/local/domain/3", "")
    Peer(core).set_perms("/local/domain/3", "n3")
    g, d0 = peer(core, 3), Peer(core)
    tx = g.tx_start()
    for i in range(10):
        d0.write(f"/other/{i}", "")
    (txobj,) = g.conn.transactions.values()
    assert len(txobj.preserved) == 0 and txobj.overflowed
    g.write("mine", "x", tx)
    assert g.tx_end(tx) == "EAGAIN", "a transaction that dropped its snapshot cannot commit"


def test_domain_shutdown_fires_release_once_until_resume(dom0: Peer) -> None:
    dom0.ok(T.INTRODUCE, b"5\x001\x007\0")
    dom0.watch("@releaseDomain", "r")
    dom0.take_events()
    dom0.core.domain_shutdown(5)
    dom0.core.domain_shutdown(5)
    assert dom0.take_events() == [("@releaseDomain", "r")]
    dom0.ok(T.RESUME, b"5\0")
    dom0.core.domain_shutdown(5)
    assert dom0.take_events() == [("@releaseDomain", "r")]


def test_introducing_dom0_fires_nothing(dom0: Peer) -> None:
    dom0.watch("@introduceDomain", "i")
    dom0.take_events()
    dom0.ok(T.INTRODUCE, b"0\x001\x001\0")
    assert dom0.take_events() == []
