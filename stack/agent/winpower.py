"""The user-mode power API of the modelled Windows (InitiateSystemShutdownEx, SetSystemPowerState,
SetSuspendState), as xenagent calls it: each request returns at once and is carried out on a thread of its
own, as winlogon carries out a shutdown after the call returned, through the same power paths the console
uses:

- power off: services stop, S5 down the device tree, the drivers unwind, then PM1a_CNT's S5 sleep type: QEMU
  powers off (it exits). The vCPU is then off, as after hibernation; `lifecycle poweron` boots it afresh
  (there is no hiberfile to resume from).
- reboot: GuestRuntime.reboot, the console's `reboot` (services stop, S5, a new boot on the same machine).
- hibernate: stack.agent.hibernate.hibernate, the console's `power S4` (the image in the hiberfile, QEMU off).
- S3: the console's `power S3` (the system power state; `power S0` wakes it).

A transition holds the runtime's power lock, which each console command waits for first (GuestRuntime.poll).
"""
from __future__ import annotations

import logging
import threading

from xenpv.stack.agent.hibernate import _sleep, hibernate
from xenpv.stack.agent.runtime import SERVICE_FACTORIES, GuestRuntime
from xenpv.stack.agent.xenagent import XenAgent
from xenpv.stack.install.installer import installed_version
from xenpv.stack.kernel import S3, S5, BugCheck
from xenpv.stack.timescale import HarnessTooSlow
from xenpv.stack.vcpu.relocation import WAITING_POWERED_OFF
from xenpv.xenabi import machine as M

log = logging.getLogger("stack.agent.winpower")


def power_off(rt: GuestRuntime) -> str:
    """A Windows shutdown that turns the machine off (what the console's `power S5` does, then PM1a_CNT)."""
    with rt.power_lock:
        rt.stop_services()
        with rt.kernel.cpu.lock:
            rt.kernel.power.set_system_state(S5)
            if rt.drivers is not None:
                rt.drivers.close()
                rt.drivers = None
            rt.kernel.log.print("setup", "shutdown complete: PM1a_CNT: S5")
            rt.vcpu.relocation.waiting = WAITING_POWERED_OFF
            _sleep(rt, M.SLP_TYP_S5)
    return "power S5: the machine is off"


class UserPower:
    def __init__(self, rt: GuestRuntime) -> None:
        self.rt = rt
        self.threads: list[threading.Thread] = []

    def _run(self, what: str, action) -> bool:  # type: ignore[no-untyped-def]
        def body() -> None:
            try:
                with self.rt.power_lock:
                    outcome = action()
                self.rt.kernel.log.print("setup", f"{what}: {outcome}")
            except (BugCheck, HarnessTooSlow) as stop:
                log.info("%s: the guest stopped: %s", what, stop)  # the console reports the STOP itself
            except Exception as exc:  # a failed transition is logged; the guest runs on where it is
                log.exception("%s failed", what)
                self.rt.kernel.log.print("setup", f"{what} failed: {type(exc).__name__}: {exc}")
        thread = threading.Thread(target=body, name=f"winlogon-{what}", daemon=True)
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()
        return True

    def InitiateSystemShutdownEx(self, reboot: bool) -> bool:
        if reboot:
            return self._run("reboot", lambda: (self.rt.reboot(), f"boot {self.rt.boots}")[1])
        return self._run("poweroff", lambda: power_off(self.rt))

    def SetSystemPowerState(self) -> bool:
        return self._run("hibernate", lambda: hibernate(self.rt))

    def SetSuspendState(self) -> bool:
        def s3() -> str:
            with self.rt.kernel.cpu.lock:
                ok = self.rt.kernel.power.set_system_state(S3)
            return "power S3: " + ("done" if ok else f"vetoed ({self.rt.kernel.power.last_veto})")
        return self._run("suspend", s3)

    def join(self, timeout: float) -> None:
        for thread in list(self.threads):
            if thread is not threading.current_thread():
                thread.join(timeout)


def start_xenagent(rt: GuestRuntime) -> XenAgent | None:
    """The xenagent service, which the XENIFACE package installs (auto-start): started when xeniface.sys is
    installed."""
    if installed_version(rt.kernel.registry, "XENIFACE") is None or rt.clock is None:
        return None
    agent = XenAgent(rt.kernel, rt.clock, UserPower(rt))
    agent.start()
    return agent


SERVICE_FACTORIES.append(start_xenagent)
