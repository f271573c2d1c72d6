"""xenagent.exe, the user-mode service over XENIFACE (XI src/xenagent/service.cpp, xenifacedevice.cpp,
devicelist.cpp at f12cbdb), as a service thread of the modelled guest.

OnServiceStart: the XENIFACE device list (GUID_INTERFACE_XENIFACE; arrivals and removals as
RegisterDeviceNotification reports them). For the first device (OnDeviceAdded): SUSPEND_REGISTER of the
suspend event, StartShutdownWatch (a watch on control/shutdown, then control/feature-poweroff, -reboot, -s3,
-s4 = "1"), SetXenTime(forced = FALSE).

ServiceMainLoop waits for the stop event, the shutdown watch's event or the suspend event, at most 30
minutes (TIME_SYNC_SECONDS):
- control/shutdown (CheckShutdown): "poweroff" and "reboot" write "" and InitiateSystemShutdownEx (the
  loop ends: the service stops); "s4" and "s3" write "" and SetSystemPowerState / SetSuspendState (the loop
  goes on). Anything else - "suspend", which XENBUS's own watch answers, or "" - is left alone.
- the suspend event (XENIFACE's SUSPEND LATE callback fired it: a Xen resume): SetXenTime(forced = TRUE),
  then CheckSuspend: when SUSPEND_GET_COUNT differs from the count it knew, the shutdown watch is stopped
  and started again (the resume deactivated it) and the feature keys rewritten.
- the timeout: SetXenTime(forced = FALSE), which TimeSyncMode = 0 under the xenagent service key turns off.

SetXenTime reads SHAREDINFO_GET_TIME; if the RTC keeps local time (Local) it compares with and sets the
local time, else the system time (UTC), when they differ at millisecond resolution (SYSTEMTIME).

Power broadcasts (SERVICE_CONTROL_POWEREVENT): on a sleep, OnDeviceSuspend stops the shutdown watch (the
system waits for that, a few seconds at most, before the sleep's IRPs take XENIFACE to D3); on the wake,
OnDeviceResume starts it again. OnServiceStop (stop or system shutdown): OnDeviceRemoved -
SUSPEND_DEREGISTER and StopShutdownWatch (the feature keys written "", the watch removed) - and the handles
close. The laptop-slate-mode watch (XENCONS's converter device) is not modelled: the model has no XENCONS.

Power requests go to the model's user-mode power API (stack.agent.winpower), which runs them on a thread
of their own, as winlogon does after InitiateSystemShutdownEx returns.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from xenpv.stack.drivers.xeniface import abi
from xenpv.stack.kernel import S0, BugCheck
from xenpv.stack.kernel.clock import SystemClock, filetime_text
from xenpv.stack.kernel.event import KEvent
from xenpv.stack.kernel.io import (FileObject, IoctlResult, IoError, RegisterDeviceNotification, SetupDiGetClassDevs,
                                   UserProcess)
from xenpv.stack.kernel.registry import KeyNotFound, ValueNotFound
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_BUFFER_OVERFLOW
from xenpv.stack.kernel.system import Kernel
from xenpv.stack.timescale import HarnessTooSlow, scaled

log = logging.getLogger("stack.agent.xenagent")

SERVICE_NAME = "xenagent"
SERVICE_KEY = rf"HKLM\SYSTEM\CurrentControlSet\Services\{SERVICE_NAME}"
TIME_SYNC_MODE_DISABLED = 0
TIME_SYNC_SECONDS = 30 * 60.0  # ServiceMainLoop's wait
STOP_SECONDS = 30.0
SUSPEND_NOTIFY_SECONDS = 2.0  # how long the system waits for a service's PBT_APMSUSPEND handling
FEATURES = ("control/feature-poweroff", "control/feature-reboot", "control/feature-s3", "control/feature-s4")


class PowerApi(Protocol):
    """What xenagent calls of the user-mode power API (stack.agent.winpower.UserPower)."""

    def InitiateSystemShutdownEx(self, reboot: bool) -> bool: ...

    def SetSystemPowerState(self) -> bool: ...

    def SetSuspendState(self) -> bool: ...


class _WakeEvent(KEvent):
    """A user-mode event the service loop waits on among others (WaitForMultipleObjectsEx)."""

    def __init__(self, name: str, wake: threading.Event) -> None:
        super().__init__(name)
        self._wake = wake

    def set(self) -> bool:
        previous = super().set()
        self._wake.set()
        return previous


class XenIfaceDevice:
    """CXenIfaceDevice: the IOCTL wrappers over one open handle. Each call enters the kernel, holding the
    processor for its duration as a system call does."""

    def __init__(self, agent: XenAgent, link: str, file: FileObject) -> None:
        self.agent = agent
        self.link = link
        self.file = file

    def ioctl(self, code: int, data: bytes = b"", out_len: int = 0) -> IoctlResult:
        with self.agent.kernel.cpu.lock:
            return self.agent.process.DeviceIoControl(self.file, code, data, out_len)

    def ok(self, code: int, data: bytes = b"", out_len: int = 0) -> bool:
        return NT_SUCCESS(self.ioctl(code, data, out_len).status)

    def StoreRead(self, path: str) -> str | None:
        key = path.encode() + b"\0"
        first = self.ioctl(abi.IOCTL_XENIFACE_STORE_READ, key, 0)
        if first.status != STATUS_BUFFER_OVERFLOW:
            return None
        result = self.ioctl(abi.IOCTL_XENIFACE_STORE_READ, key, first.information)
        return result.output.split(b"\0", 1)[0].decode(errors="replace") if NT_SUCCESS(result.status) else None

    def StoreWrite(self, path: str, value: str) -> bool:
        return self.ok(abi.IOCTL_XENIFACE_STORE_WRITE, path.encode() + b"\0" + value.encode() + b"\0\0")

    def StoreAddWatch(self, path: str, event: int) -> int | None:
        data = path.encode() + b"\0"
        request = abi.XENIFACE_STORE_ADD_WATCH_IN(Path=self.agent.process.buffer(data), PathLength=len(data),
                                                  Event=event)
        result = self.ioctl(abi.IOCTL_XENIFACE_STORE_ADD_WATCH, request.pack(), abi.XENIFACE_STORE_ADD_WATCH_OUT.size())
        return abi.XENIFACE_STORE_ADD_WATCH_OUT.unpack(result.output).Context if NT_SUCCESS(result.status) else None

    def StoreRemoveWatch(self, context: int) -> bool:
        return self.ok(abi.IOCTL_XENIFACE_STORE_REMOVE_WATCH, abi.XENIFACE_STORE_REMOVE_WATCH_IN(Context=context).pack())

    def SuspendRegister(self, event: int) -> int | None:
        result = self.ioctl(abi.IOCTL_XENIFACE_SUSPEND_REGISTER, abi.XENIFACE_SUSPEND_REGISTER_IN(Event=event).pack(),
                            abi.XENIFACE_SUSPEND_REGISTER_OUT.size())
        return abi.XENIFACE_SUSPEND_REGISTER_OUT.unpack(result.output).Context if NT_SUCCESS(result.status) else None

    def SuspendDeregister(self, context: int) -> bool:
        return self.ok(abi.IOCTL_XENIFACE_SUSPEND_DEREGISTER, abi.XENIFACE_SUSPEND_REGISTER_OUT(Context=context).pack())

    def SuspendGetCount(self) -> int | None:
        result = self.ioctl(abi.IOCTL_XENIFACE_SUSPEND_GET_COUNT, b"", abi.ULONG_SIZE)
        return int.from_bytes(result.output, "little") if NT_SUCCESS(result.status) else None

    def SharedInfoGetTime(self) -> tuple[int, bool] | None:
        result = self.ioctl(abi.IOCTL_XENIFACE_SHAREDINFO_GET_TIME, b"", abi.XENIFACE_SHAREDINFO_GET_TIME_OUT.size())
        if not NT_SUCCESS(result.status):
            return None
        out = abi.XENIFACE_SHAREDINFO_GET_TIME_OUT.unpack(result.output)
        return out.Time.dwHighDateTime << 32 | out.Time.dwLowDateTime, bool(out.Local)

    def Log(self, message: str) -> bool:
        return self.ok(abi.IOCTL_XENIFACE_LOG, message.encode("ascii", "replace")[:abi.XENIFACE_LOG_MAX_LENGTH - 1] + b"\0")


@dataclass
class AgentStatus:
    running: bool
    device: str | None
    shutdown_watch: bool
    suspend_count: int
    time_syncs: int
    requests: list[str] = field(default_factory=list)


class XenAgent:
    """One run of the service (one boot): `start()` is the service control manager starting it, `stop()`
    SERVICE_CONTROL_STOP / _SHUTDOWN (it returns once the service has stopped)."""

    def __init__(self, kernel: Kernel, clock: SystemClock, power: PowerApi, *, period: float = TIME_SYNC_SECONDS) -> None:
        self.kernel = kernel
        self.clock = clock
        self.power = power
        self.period = period
        self.process = UserProcess(kernel.pnp, "xenagent.exe")
        self._wake = threading.Event()
        self._stop = False
        self._crit = threading.RLock()  # m_crit: the device list and the contexts
        self._device_changes = False
        self._power_events: collections.deque[tuple[int, threading.Event]] = collections.deque()
        self._evt_shutdown_handle, self.evt_shutdown = self.process.CreateEvent(
            "shutdown", _WakeEvent("xenagent shutdown", self._wake))
        self._evt_suspend_handle, self.evt_suspend = self.process.CreateEvent(
            "suspend", _WakeEvent("xenagent suspend", self._wake))
        self.device: XenIfaceDevice | None = None
        self.ctxt_shutdown: int | None = None
        self.ctxt_suspend: int | None = None
        self.count = 0  # m_count: the SUSPEND count the watches were made in
        self.time_syncs = 0
        self.requests: list[str] = []  # control/shutdown requests acted on, in order
        self._unregister: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None

    # -- the service control manager's side ---------------------------------------------------------

    def start(self) -> None:
        self._unregister = RegisterDeviceNotification(self.kernel.pnp, abi.GUID_INTERFACE_XENIFACE, self._device_event)
        self.kernel.power.broadcasts.append(self._power_event)
        self._device_changes = True  # the devices already there: CDeviceList::Start enumerates them
        self._wake.set()
        self._thread = threading.Thread(target=self._service_main, name="xenagent", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        self._stop = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # The service may be inside an IOCTL that waits for xenstored: it needs the processor to finish.
            with self.kernel.cpu.lock.released():
                thread.join(timeout)
            if thread.is_alive():
                log.error("xenagent did not stop within %gs", timeout)
        self._detach()

    def _detach(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        if self._power_event in self.kernel.power.broadcasts:
            self.kernel.power.broadcasts.remove(self._power_event)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> AgentStatus:
        with self._crit:
            return AgentStatus(self.running, self.device.link if self.device else None, self.ctxt_shutdown is not None,
                               self.count, self.time_syncs, list(self.requests))

    def _device_event(self, _link: str, _arrived: bool) -> None:
        self._device_changes = True
        self._wake.set()

    def _power_event(self, state: int) -> None:
        """SERVICE_CONTROL_POWEREVENT. The system waits for the services' PBT_APMSUSPEND handling before the
        sleep's IRPs (a few seconds at most, then it goes on); the resume is only posted. While it waits the
        processor is given away, so the service's IOCTLs can run."""
        handled = threading.Event()
        self._power_events.append((state, handled))
        self._wake.set()
        if state == S0 or not self.running or threading.current_thread() is self._thread:
            return
        cpu = self.kernel.cpu
        saved = cpu.give_away()
        try:
            if not handled.wait(scaled(SUSPEND_NOTIFY_SECONDS)):
                log.warning("xenagent did not handle the sleep notification within %gs", scaled(SUSPEND_NOTIFY_SECONDS))
        finally:
            cpu.take_back(saved, "notifying xenagent of the sleep")

    # -- the service thread ----------------------------------------------------------------------------

    def _service_main(self) -> None:
        try:
            next_sync = time.monotonic() + self.period
            while not self._stop:
                self._wake.wait(max(0.0, next_sync - time.monotonic()))
                self._wake.clear()
                if self._stop:
                    break
                if self.kernel.cpu.halted is not None:
                    return  # the guest stopped: nothing runs any more
                self._devices()
                self._power()
                if self.evt_shutdown.read_state():
                    self.evt_shutdown.clear()
                    if self.CheckShutdown():
                        break
                if self.evt_suspend.read_state():
                    self.evt_suspend.clear()
                    self.CheckXenTime(True)
                    self.CheckSuspend()
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self.period
                    self.CheckXenTime(False)
            self.OnServiceStop()
        except (BugCheck, HarnessTooSlow) as stop:
            log.info("xenagent ends: the guest stopped (%s)", stop)
        except IoError as exc:
            log.warning("xenagent ends: %s", exc)
        finally:
            self._detach()

    def OnServiceStop(self) -> None:
        with self._crit:
            if self.device is not None:
                self.OnDeviceRemoved(self.device)
                self.device = None
        if self.kernel.cpu.halted is None:
            with self.kernel.cpu.lock:
                self.process.exit()

    def _devices(self) -> None:
        """DeviceArrival / DeviceRemoved: the first XENIFACE interface present is the one used."""
        if not self._device_changes:
            return
        self._device_changes = False
        with self._crit:
            present = SetupDiGetClassDevs(self.kernel.pnp, abi.GUID_INTERFACE_XENIFACE)
            if self.device is not None and self.device.link not in present:
                gone, self.device = self.device, None
                self.ctxt_shutdown = self.ctxt_suspend = None  # the FDO dropped them with the device
                with self.kernel.cpu.lock:
                    self.process.CloseHandle(gone.file)
            if self.device is None and present:
                try:
                    with self.kernel.cpu.lock:
                        file = self.process.CreateFile(present[0])
                except IoError as exc:  # gone again between the enumeration and the open: wait for the next
                    log.info("xenagent: %s", exc)
                    return
                self.device = XenIfaceDevice(self, present[0], file)
                self.OnDeviceAdded(self.device)

    def _power(self) -> None:
        while self._power_events:
            state, handled = self._power_events.popleft()
            try:
                with self._crit:
                    if self.device is None:
                        continue
                    if state == S0:
                        self.OnDeviceResume(self.device)
                    else:
                        self.OnDeviceSuspend(self.device)
            finally:
                handled.set()

    # -- CXenIfaceDeviceList ----------------------------------------------------------------------------

    def OnDeviceAdded(self, device: XenIfaceDevice) -> None:
        self.ctxt_suspend = device.SuspendRegister(self._evt_suspend_handle)
        self.StartShutdownWatch(device)
        self.SetXenTime(device, False)

    def OnDeviceRemoved(self, device: XenIfaceDevice) -> None:
        if self.ctxt_suspend is not None:
            device.SuspendDeregister(self.ctxt_suspend)
        self.ctxt_suspend = None
        self.StopShutdownWatch(device)

    def OnDeviceSuspend(self, device: XenIfaceDevice) -> None:
        self.StopShutdownWatch(device)

    def OnDeviceResume(self, device: XenIfaceDevice) -> None:
        self.StartShutdownWatch(device)

    def StartShutdownWatch(self, device: XenIfaceDevice) -> None:
        if self.ctxt_shutdown is not None:
            return
        self.ctxt_shutdown = device.StoreAddWatch("control/shutdown", self._evt_shutdown_handle)
        for feature in FEATURES:
            device.StoreWrite(feature, "1")

    def StopShutdownWatch(self, device: XenIfaceDevice) -> None:
        if self.ctxt_shutdown is None:
            return
        for feature in FEATURES:
            device.StoreWrite(feature, "")
        device.StoreRemoveWatch(self.ctxt_shutdown)
        self.ctxt_shutdown = None

    def CheckShutdown(self) -> bool:
        """True when the service must end (poweroff, reboot)."""
        with self._crit:
            device = self.device
            if device is None:
                return False
            request = device.StoreRead("control/shutdown")
            if request is None:
                return False
            if request:
                self._log(device, f"Shutdown({device.link}) = '{request}'")
            if request not in ("poweroff", "reboot", "s4", "s3"):
                return False
            device.StoreWrite("control/shutdown", "")
            self.requests.append(request)
        if request == "poweroff":
            self.power.InitiateSystemShutdownEx(reboot=False)
            return True
        if request == "reboot":
            self.power.InitiateSystemShutdownEx(reboot=True)
            return True
        if request == "s4":
            self.power.SetSystemPowerState()
        else:
            self.power.SetSuspendState()
        return False

    def CheckXenTime(self, forced: bool) -> None:
        with self._crit:
            if self.device is not None:
                self.SetXenTime(self.device, forced)

    def CheckSuspend(self) -> None:
        with self._crit:
            device = self.device
            if device is None:
                return
            count = device.SuspendGetCount()
            if count is None or count == self.count:
                return
            self._log(device, f"Suspend({device.link})")
            # recreate watches, as suspending deactivated the watch
            self.StopShutdownWatch(device)
            self.StartShutdownWatch(device)
            self.count = count

    def SetXenTime(self, device: XenIfaceDevice, forced: bool) -> None:
        if not forced and self._time_sync_mode() == TIME_SYNC_MODE_DISABLED:
            return
        now = device.SharedInfoGetTime()
        if now is None:
            return
        xen, local = now
        current = self.clock.query_local_time() if local else self.clock.query_system_time()
        if current // 10_000 == xen // 10_000:  # SYSTEMTIME has milliseconds
            return
        self._log(device, f"RTC is in {'local time' if local else 'UTC'}")
        self._log(device, f"Time Now = {filetime_text(current)}")
        self._log(device, f"New Time = {filetime_text(xen)}")
        if local:
            self.clock.set_local_time(xen)
        else:
            self.clock.set_system_time(xen)
        self.time_syncs += 1

    def _time_sync_mode(self) -> int | None:
        try:
            return self.kernel.registry.get_dword(SERVICE_KEY, "TimeSyncMode")
        except (KeyNotFound, ValueNotFound):
            return None

    def _log(self, device: XenIfaceDevice, message: str) -> None:
        """CXenAgent::Log: to XENIFACE's log (IOCTL_XENIFACE_LOG), which the guest's debug log shows."""
        log.info("%s", message)
        device.Log(message)
