"""The subscriber-era veto at both ends of a provider's MIN..MAX (reference windows-pv-drivers.md §5a,
coinst.c SupportRegisteredSubscribers): a registered subscription exactly at MIN or MAX is supported, one
below MIN or above MAX vetoes the install with ERROR_REVISION_MISMATCH and changes nothing (issue 18)."""
from __future__ import annotations

import pytest

from xenpv.stack.install import Era, Installer, InstallVetoed, PlatformPciDevice, installed_version
from xenpv.stack.install.packages import get_package
from xenpv.stack.kernel.registry import Registry

ERROR_REVISION_MISMATCH = 1306  # winerror.h, written out: the model's constant is under test

SERVICES = r"HKLM\SYSTEM\CurrentControlSet\Services"
BUS = "8.0.0.1"


def _registered(provider: str, interface: str, version: int) -> tuple[Registry, Installer]:
    """A registry where subscriber XENTEST already uses `provider`'s `interface` at `version`."""
    registry = Registry()
    registry.set_dword(rf"{SERVICES}\{provider}\Interfaces\XENTEST", interface, version)
    return registry, Installer(registry, platform=[PlatformPciDevice(0x0001)])


def _cases() -> list[tuple[str, str, int, bool]]:
    package = get_package("xenbus", BUS)
    cases = []
    for provider, interface in (("XENBUS", "EVTCHN"), ("XENBUS", "SHARED_INFO"), ("XENFILT", "UNPLUG")):
        r = package.range(provider, interface)
        assert r is not None
        cases += [(provider, interface, r.min - 1, False), (provider, interface, r.min, True),
                  (provider, interface, r.max, True), (provider, interface, r.max + 1, False)]
    return cases


def test_the_ranges_under_test_have_distinct_ends() -> None:
    package = get_package("xenbus", BUS)
    assert (package.range("XENBUS", "EVTCHN").min, package.range("XENBUS", "EVTCHN").max) == (1, 4)
    assert (package.range("XENBUS", "SHARED_INFO").min, package.range("XENBUS", "SHARED_INFO").max) == (1, 2)


@pytest.mark.parametrize("provider, interface, version, supported", _cases())
def test_subscription_at_and_beyond_each_end(provider: str, interface: str, version: int, supported: bool) -> None:
    registry, installer = _registered(provider, interface, version)
    if supported:
        installer.install("xenbus", BUS, era=Era.SUBSCRIBER)
        assert str(installed_version(registry, "xenbus")) == BUS
        assert registry.get_dword(rf"{SERVICES}\{provider}\Interfaces\XENTEST", interface) == version
        return
    with pytest.raises(InstallVetoed) as info:
        installer.install("xenbus", BUS, era=Era.SUBSCRIBER)
    assert info.value.error == ERROR_REVISION_MISMATCH
    assert f"XENTEST uses {provider} {interface} interface version {version}" in info.value.reason
    assert installed_version(registry, "xenbus") is None
    assert not registry.key_exists(rf"{SERVICES}\XENBUS\Parameters")


def test_an_interface_the_provider_does_not_offer_vetoes() -> None:
    _, installer = _registered("XENBUS", "BALLOON", 1)
    with pytest.raises(InstallVetoed, match="does not provide it"):
        installer.install("xenbus", BUS, era=Era.SUBSCRIBER)


def test_values_other_than_dwords_are_not_subscriptions() -> None:
    registry = Registry()
    registry.set_sz(rf"{SERVICES}\XENBUS\Interfaces\XENTEST", "EVTCHN", "99")
    Installer(registry, platform=[PlatformPciDevice(0x0001)]).install("xenbus", BUS, era=Era.SUBSCRIBER)
    assert str(installed_version(registry, "xenbus")) == BUS


def test_a_veto_says_who_blocks_what_in_one_line() -> None:
    """The message setupapi's log would carry: the package, the Win32 error by name (its number when the
    name is not known), the subscriber, its interface version and the range the new provider supports."""
    from xenpv.stack.install.installer import InstallVetoed as Vetoed
    _, installer = _registered("XENBUS", "EVTCHN", 5)
    with pytest.raises(InstallVetoed) as info:
        installer.install("xenbus", BUS, era=Era.SUBSCRIBER)
    assert str(info.value) == ("xenbus 8.0.0.1: install vetoed (ERROR_REVISION_MISMATCH): subscriber XENTEST uses "
                               "XENBUS EVTCHN interface version 5; xenbus 8.0.0.1 supports 1..4; upgrade XENTEST first")
    assert info.value.package == "xenbus 8.0.0.1"
    assert Vetoed("p", 1234, "why").error_name == "ERROR_1234"


def test_a_dword_after_another_value_is_still_a_subscription() -> None:
    """coinst.c walks every value of the subscriber's key: one that is not a DWORD is passed over, and the
    DWORD after it is still checked."""
    registry = Registry()
    key = rf"{SERVICES}\XENBUS\Interfaces\XENTEST"
    registry.set_sz(key, "EVTCHN", "99")
    registry.set_dword(key, "SHARED_INFO", 9)
    with pytest.raises(InstallVetoed) as info:
        Installer(registry, platform=[PlatformPciDevice(0x0001)]).install("xenbus", BUS, era=Era.SUBSCRIBER)
    assert "SHARED_INFO interface version 9" in info.value.reason
