"""XenPlatform.start finds the Xen platform device's BAR (where shared_info and the grant frames go): placed
by the firmware step when the boot ran it, placed by XenPlatform itself when nothing did."""
from __future__ import annotations

import pytest

from xenpv.stack.vcpu.pci import MMIO_WINDOW, PciBus
from xenpv.stack.vcpu.platform import XEN_PLATFORM_VENDOR, XenPlatform

pytestmark = pytest.mark.integration


def _platform_bar(vcpu) -> int:
    (f,) = [f for f in PciBus(vcpu).enumerate() if f.vendor_id == XEN_PLATFORM_VENDOR]
    (bar,) = f.bars
    return bar.address


def test_a_platform_started_before_any_firmware_step_places_its_bar(xen_guest_factory) -> None:
    d = xen_guest_factory("default")
    assert _platform_bar(d.vcpu) == 0
    platform = XenPlatform.start(d.vcpu, d.machine.guest.memory_mib << 8)
    try:
        (bar,) = platform.device.bars
        assert MMIO_WINDOW[0] <= bar.address < MMIO_WINDOW[1]
        assert _platform_bar(d.vcpu) == bar.address  # the device decodes where the platform put its frames
    finally:
        platform.close()


def test_a_platform_started_after_the_firmware_step_keeps_its_bar(xen_guest_factory) -> None:
    d = xen_guest_factory("default")
    (placed,) = [f for f in PciBus(d.vcpu).assign_resources() if f.vendor_id == XEN_PLATFORM_VENDOR]
    platform = XenPlatform.start(d.vcpu, d.machine.guest.memory_mib << 8)
    try:
        assert platform.device == placed
    finally:
        platform.close()
