"""The libvirt launcher's pieces without a daemon: the schema field, the shapes and URIs it refuses, the
domain XML, libvirt's lifecycle events as event records (harness.libvirt_launcher)."""
from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from xenpv.base.errors import ConfigError, GuestDefinitionError, LaunchFailure
from xenpv.guests.schema import GUESTS_DIR, load_guest
from xenpv.harness.libvirt_launcher import (LibvirtMachine, LibvirtTarget, check_local_uri, domain_xml,
                                           lifecycle_record)
from xenpv.harness.machine import MachinePaths

STOCK_QEMU = "/usr/bin/qemu-system-x86_64"


def _libvirt_guest(tmp_path: Path, shape: str, launcher: str = "libvirt") -> Path:
    path = tmp_path / f"{shape}-{launcher}.yaml"
    path.write_text((GUESTS_DIR / f"{shape}.yaml").read_text() + f"launcher: {launcher}\n")
    return path


def test_launcher_field(tmp_path) -> None:
    assert load_guest(GUESTS_DIR / "no-platform.yaml").launcher == "qemu"
    assert load_guest(_libvirt_guest(tmp_path, "no-platform")).launcher == "libvirt"
    with pytest.raises(GuestDefinitionError, match=r"launcher.*must be one of qemu, libvirt, got 'virsh'"):
        load_guest(_libvirt_guest(tmp_path, "no-platform", "virsh"))


def test_a_platform_guest_is_refused_with_the_reason(tmp_path) -> None:
    with pytest.raises(GuestDefinitionError, match="launcher.*no Xen platform device"):
        load_guest(_libvirt_guest(tmp_path, "default"))
    with pytest.raises(LaunchFailure, match="cannot launch through libvirt.*xen-pvdevice"):
        LibvirtMachine(load_guest(GUESTS_DIR / "default.yaml"), tmp_path / "m", target=LibvirtTarget("qemu:///system"))


def test_a_remote_or_foreign_uri_is_refused() -> None:
    with pytest.raises(ConfigError, match="must run here, not on host9"):
        check_local_uri("qemu+ssh://root@host9/system")
    with pytest.raises(ConfigError, match="not a QEMU driver URI"):
        check_local_uri("xen:///system")
    assert check_local_uri("qemu+unix:///system?socket=/tmp/x") == "qemu+unix:///system?socket=/tmp/x"


def test_domain_xml_keeps_the_harness_machine(tmp_path) -> None:
    guest = load_guest(GUESTS_DIR / "no-platform.yaml")
    paths = MachinePaths(tmp_path, tmp_path)
    xml = domain_xml(guest, domain="d", binary=STOCK_QEMU, paths=paths)
    for arg in (f"memory-backend-file,id=xenpv-ram,mem-path={tmp_path / 'ram'},size=128M,share=on",
                f"unix:{tmp_path / 'qtest.sock'},server=on,wait=off", "ide-hd,id=hda,drive=drive-hda,bus=ide.0,unit=0",
                "rtl8139,id=nic0,mac=00:16:3e:00:00:03"):
        assert f"value=\"{arg}\"" in xml, arg


def test_lifecycle_events_carry_libvirts_names() -> None:
    record = lifecycle_record("d", libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_API_ERROR)
    assert (record["event"], record["source"]) == ("LIBVIRT_LIFECYCLE", "libvirt")
    assert record["data"] == {"domain": "d", "event": "suspended", "detail": "api_error"}
    assert lifecycle_record("d", libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED)["data"]["detail"] == "crashed"


def test_libvirtd_init_refuses_to_run_outside_its_namespace(capsys) -> None:
    from xenpv.harness.libvirtd import main
    with pytest.raises(SystemExit) as ended:
        main(["--init", "/nonexistent"])
    assert ended.value.code == 2 and "runs as PID 1 of a new PID namespace" in capsys.readouterr().err


def test_private_libvirtd_needs_the_daemon(tmp_path) -> None:
    from xenpv.harness.libvirtd import PrivateLibvirtd
    with pytest.raises(ConfigError, match="/nonexistent/libvirtd is missing.*apt-get install libvirt-daemon"):
        PrivateLibvirtd.start(tmp_path / "log", libvirtd="/nonexistent/libvirtd")
