"""The power manager: system power IRPs, device power IRPs requested by drivers, and 0x9F.

Windows order, as modelled:
- Going to sleep (S0 -> S3/S4/S5): IRP_MN_QUERY_POWER for the target system state to every started device
  node, children before parents; if any fails, the transition is vetoed and the nodes already queried get
  IRP_MN_SET_POWER(S0) to cancel. Otherwise IRP_MN_SET_POWER(Sx) to each node, children before parents.
  (S5 is shutdown: Windows sends no QUERY_POWER before it; neither does the model.)
- Waking (-> S0): IRP_MN_SET_POWER(S0), parents before children.
- The power policy owner (normally the FDO) turns each S-IRP into a D-IRP with `PoRequestPowerIrp`; that
  D-IRP goes to the top of the device's stack and its completion function runs when the IRP completes.
  A completed D-IRP SET_POWER updates the node's device power state.
- Every IRP must complete before the power manager moves on. One that is still pending after
  `irp_timeout` seconds stops the guest with DRIVER_POWER_STATE_FAILURE (0x9F), p1 = 3 ("a device object
  has been blocking an IRP for too long"), p2 = the PDO, p3 = the top device, p4 = the IRP, blaming the
  driver that holds it. (Windows' watchdog is ten minutes; a test wants seconds. The seconds are scaled
  by XENPV_TIME_SCALE, stack.timescale, so a loaded machine does not turn a slow IRP into a 0x9F.)

Simplifications: no power relations, no idle detection, no wait-wake arming, no PoStartNextPowerIrp
serialisation (it is a no-op since Vista anyway); Sx -> Sy without S0 in between is refused.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xenpv.stack.timescale import scaled

from .bugcheck import BugCheckCode, KeBugCheckEx
from .debuglog import DbgLevel, DebugLog
from .device import DeviceObject, IoGetAttachedDevice
from .event import KEvent, KeWaitForSingleObject
from .irp import (DEVICE_POWER_STATE, IRP_MN_POWER, POWER_ACTION, POWER_STATE_TYPE, SYSTEM_POWER_STATE,
                  IoCallDriver, IoStatusBlock, Irp, PowerParameters)
from .pnp import DeviceNode, DeviceNodeState, PnpManager
from .status import NT_SUCCESS, STATUS_PENDING, status_name

log = logging.getLogger("stack.kernel.power")

S0 = SYSTEM_POWER_STATE.PowerSystemWorking
S3 = SYSTEM_POWER_STATE.PowerSystemSleeping3
S4 = SYSTEM_POWER_STATE.PowerSystemHibernate
S5 = SYSTEM_POWER_STATE.PowerSystemShutdown
D0 = DEVICE_POWER_STATE.PowerDeviceD0
D3 = DEVICE_POWER_STATE.PowerDeviceD3

_ACTIONS = {S3: POWER_ACTION.PowerActionSleep, S4: POWER_ACTION.PowerActionHibernate,
            S5: POWER_ACTION.PowerActionShutdownOff, S0: POWER_ACTION.PowerActionNone}

PowerCompletion = Callable[[DeviceObject, int, DEVICE_POWER_STATE, Any, IoStatusBlock], None]


@dataclass
class PowerVeto:
    """Why a transition did not happen: the node that failed QUERY_POWER and its status."""

    instance_path: str
    status: int

    def __str__(self) -> str:
        return f"{self.instance_path} failed QUERY_POWER with {status_name(self.status)}"


class PowerManager:
    def __init__(self, pnp: PnpManager, debug_log: DebugLog, *, irp_timeout: float = 5.0) -> None:
        self.pnp = pnp
        self.debug_log = debug_log
        self.irp_timeout = irp_timeout
        self.system_state = S0
        self.last_veto: PowerVeto | None = None
        # The power broadcast services get (SERVICE_CONTROL_POWEREVENT): called with the target state
        # before the IRPs of a sleep (PBT_APMSUSPEND) and with S0 after a wake (PBT_APMRESUMEAUTOMATIC).
        # On the transition's thread, holding the processor: a receiver takes note and returns.
        self.broadcasts: list[Callable[[SYSTEM_POWER_STATE], None]] = []
        pnp.power = self

    def _started(self, children_first: bool) -> list[DeviceNode]:
        walk = self.pnp.root.walk_children_first() if children_first else self.pnp.root.walk()
        return [n for n in walk if n is not self.pnp.root and n.state == DeviceNodeState.STARTED]

    def set_system_state(self, target: SYSTEM_POWER_STATE) -> bool:
        """Move the guest to `target`; False (and `last_veto`) if a driver vetoed it."""
        target = SYSTEM_POWER_STATE(target)
        if target == self.system_state:
            return True
        if target != S0 and self.system_state != S0:
            raise ValueError(f"{self.system_state.name} -> {target.name}: wake to S0 first")
        self.last_veto = None
        self._print(f"{self.system_state.name} -> {target.name}")
        if target == S0:
            for node in self._started(children_first=False):
                self._system_irp(node, IRP_MN_POWER.SET_POWER, S0)
        else:
            nodes = self._started(children_first=True)
            if target != S5:
                queried: list[DeviceNode] = []
                for node in nodes:
                    status = self._system_irp(node, IRP_MN_POWER.QUERY_POWER, target)
                    if not NT_SUCCESS(status):
                        self.last_veto = PowerVeto(node.instance_path, status)
                        self._print(f"veto: {self.last_veto}", DbgLevel.WARNING)
                        for done in queried:
                            self._system_irp(done, IRP_MN_POWER.SET_POWER, S0)
                        return False
                    queried.append(node)
            self._broadcast(target)
            for node in nodes:
                self._system_irp(node, IRP_MN_POWER.SET_POWER, target)
        self.system_state = target
        if target == S0:
            self._broadcast(S0)
        return True

    def _broadcast(self, state: SYSTEM_POWER_STATE) -> None:
        for receiver in list(self.broadcasts):
            receiver(state)

    def _system_irp(self, node: DeviceNode, minor: IRP_MN_POWER, state: SYSTEM_POWER_STATE) -> int:
        irp = Irp.power(minor, PowerParameters(POWER_STATE_TYPE.SystemPowerState, state, _ACTIONS[state]))
        return self._send_and_wait(node.pdo, irp)

    def _send_and_wait(self, pdo: DeviceObject, irp: Irp) -> int:
        done = KEvent(f"power {irp.name()}")
        irp.on_complete.append(lambda _irp: done.set())
        top = IoGetAttachedDevice(pdo)
        IoCallDriver(top, irp)
        timeout = scaled(self.irp_timeout)
        if not irp.completed:
            KeWaitForSingleObject(done, timeout)
        if not irp.completed:
            holder = irp.stack[-1].device if irp.stack else top
            raise KeBugCheckEx(BugCheckCode.DRIVER_POWER_STATE_FAILURE, 3, pdo, top, irp,
                               module=holder.driver.module,
                               message=f"{irp.name()} {irp.parameters.describe()} not completed by "
                                       f"{holder!r} within {timeout:g}s")
        return irp.io_status.status

    def request_device_irp(self, device: DeviceObject, minor: int, state: DEVICE_POWER_STATE,
                           completion: PowerCompletion | None = None, context: Any = None) -> int:
        """PoRequestPowerIrp: send a D-IRP to the top of `device`'s stack; returns STATUS_PENDING."""
        irp = Irp.power(minor, PowerParameters(POWER_STATE_TYPE.DevicePowerState, state))
        node = device.pdo.device_node

        def finished(done: Irp) -> None:
            if minor == IRP_MN_POWER.SET_POWER and NT_SUCCESS(done.io_status.status) and node is not None:
                node.device_power = state
            if completion is not None:
                completion(device, minor, state, context, done.io_status)

        irp.on_complete.append(finished)
        IoCallDriver(IoGetAttachedDevice(device), irp)
        return STATUS_PENDING

    def _print(self, text: str, level: DbgLevel = DbgLevel.INFO) -> None:
        self.debug_log.print("POWER", text, level)


def PoRequestPowerIrp(device: DeviceObject, minor: int, state: DEVICE_POWER_STATE,
                      completion: PowerCompletion | None = None, context: Any = None) -> int:
    node = device.pdo.device_node
    if node is None:
        raise ValueError(f"{device!r} is not in a PnP device stack")
    manager = node.manager.power
    if manager is None:
        raise RuntimeError("no power manager is attached to this PnP manager")
    return manager.request_device_irp(device, minor, state, completion, context)


def PoStartNextPowerIrp(irp: Irp) -> None:
    """A no-op since Windows Vista; kept so driver code reads like the C drivers."""


def PoCallDriver(device: DeviceObject, irp: Irp) -> int:
    return IoCallDriver(device, irp)
