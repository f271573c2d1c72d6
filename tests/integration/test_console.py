"""The guest console through a real agent, driven over pexpect as the harness drives it: a bad line is a
message and the session goes on, and what help shows is what the commands accept."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def _references(console) -> dict[str, int]:
    return {name: int(count) for name, count in (line.split() for line in console.run("interfaces").splitlines())}


def test_bad_lines_are_messages_and_the_session_goes_on(boot_guest) -> None:
    c = boot_guest("default").console
    assert c.run('xs write "unbalanced') == "error: cannot split the line into words: No closing quotation"
    assert c.run("xs read name") == "default"  # same session, same agent
    out = c.run("vbd read 0 zero 1")
    assert out.startswith("vbd: LBA must be a number, got 'zero'\nusage: vbd list\n"), out
    assert c.run("xs frob name").startswith("usage: xs read PATH\n")
    assert c.run("") == ""
    assert "5853:0001" in c.run("pci")


def test_help_names_the_interface_as_fault_leak_ref_accepts_it(boot_guest) -> None:
    c = boot_guest("default").console
    assert "fault leak-ref INTERFACE" in c.run("help fault")
    held = _references(c)["XENBUS.STORE"]
    # As `interfaces` names it, and bare.
    assert "one reference acquired and never released" in c.run("fault leak-ref XENBUS.STORE")
    assert "one reference acquired and never released" in c.run("fault leak-ref store")
    assert _references(c)["XENBUS.STORE"] == held + 2
    out = c.run("fault leak-ref XENBUS.NOPE")
    assert out.startswith("fault: XENBUS has no interface 'XENBUS.NOPE' (it has DEBUG, ") and "STORE" in out, out
