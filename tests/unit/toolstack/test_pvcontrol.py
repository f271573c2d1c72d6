"""backends.toolstack.domain.pvcontrol_domain against libxl__domain_pvcontrol and pvcontrol_acked (xen
tools/libs/light/libxl_domain.c): write control/shutdown, the guest's "" (or the node's removal) is the
acknowledgement, a guest that never answers is an error with the request left in place."""
from __future__ import annotations

import threading

import pytest

from xenpv.backends.toolstack import ToolstackError
from xenpv.backends.toolstack.domain import pvcontrol_domain
from xenpv.backends.xenstored.client import XsRequestError


class Xs:
    def __init__(self, answer: str | None = "", after: int = 2) -> None:
        self.tree: dict[str, bytes] = {}
        self.reads = 0
        self.answer, self.after = answer, after
        self.lock = threading.Lock()

    def write(self, path: str, value: str) -> None:
        self.tree[path] = value.encode()

    def read(self, path: str) -> bytes:
        self.reads += 1
        if self.reads == self.after and self.answer is not None:  # the guest answers
            self.tree[path] = self.answer.encode()
        if self.reads == self.after and self.answer is None:
            self.tree.pop(path, None)
        if path not in self.tree:
            raise XsRequestError("ENOENT", "READ", path)
        return self.tree[path]


class Ctl:
    def __init__(self, domids: tuple[int, ...] = (5,)) -> None:
        self.domids = domids

    def call(self, op: str, **_: object) -> list[dict]:
        assert op == "list_domains"
        return [{"domid": d, "state": "running"} for d in self.domids]


NODE = "/local/domain/5/control/shutdown"


@pytest.mark.parametrize("command", ["poweroff", "reboot", "s3", "s4"])
def test_the_request_is_written_and_the_empty_answer_acknowledges_it(command: str) -> None:
    xs = Xs("")
    pvcontrol_domain(xs, Ctl(), 5, command, ack_timeout=5.0)  # type: ignore[arg-type]
    assert xs.tree[NODE] == b"" and xs.reads == 2


def test_the_node_removed_is_an_acknowledgement_too() -> None:
    xs = Xs(None)
    pvcontrol_domain(xs, Ctl(), 5, "reboot", ack_timeout=5.0)  # type: ignore[arg-type]
    assert NODE not in xs.tree


def test_no_answer_is_an_error_and_the_request_stays() -> None:
    xs = Xs("poweroff", after=10**9)
    with pytest.raises(ToolstackError, match="guest didn't acknowledge control request within 0.2s"):
        pvcontrol_domain(xs, Ctl(), 5, "poweroff", ack_timeout=0.2)  # type: ignore[arg-type]
    assert xs.tree[NODE] == b"poweroff"


def test_unknown_commands_and_domains_are_refused() -> None:
    with pytest.raises(ValueError, match="'suspend': not one of poweroff, reboot, s3, s4"):
        pvcontrol_domain(Xs(), Ctl(), 5, "suspend")  # type: ignore[arg-type]
    with pytest.raises(ToolstackError, match="no such domain"):
        pvcontrol_domain(Xs(), Ctl(()), 5, "reboot")  # type: ignore[arg-type]
