from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest

from xenpv.stack.kernel import (DISPATCH_LEVEL, HIGH_LEVEL, IRP_MJ, IRP_MN_PNP, PASSIVE_LEVEL, BugCheck, BugCheckCode,
                          DeviceKind, DeviceObject, DriverObject, Irp, IoAttachDeviceToDeviceStack, IoCallDriver,
                          IoCompleteRequest, IoConnectInterrupt, IoCreateDevice, IoSetCompletionRoutine,
                          IoSynchronousCallDriver, KDpc, KEvent, KeGetCurrentIrql, KeInitializeDpc,
                          KeInsertQueueDpc, KeLowerIrql, KeRaiseIrql, KInterrupt, Kernel, Processor,
                          QueryInterfaceParameters, forward)
from xenpv.stack.kernel.status import (STATUS_MORE_PROCESSING_REQUIRED, STATUS_NOT_SUPPORTED, STATUS_PENDING,
                                 STATUS_SUCCESS)


def two_level_stack(order: list[str]) -> tuple[DeviceObject, DeviceObject]:
    """A PDO (bus driver) and an FDO that forwards everything and records completion."""
    bus, function = DriverObject("BUS"), DriverObject("FUNC")

    def pdo_dispatch(device: DeviceObject, irp: Irp) -> int:
        order.append("pdo dispatch")
        irp.io_status.status = STATUS_SUCCESS
        IoCompleteRequest(irp)
        return STATUS_SUCCESS

    def fdo_dispatch(device: DeviceObject, irp: Irp) -> int:
        order.append("fdo dispatch")

        def completion(dev: DeviceObject, done: Irp, context: Any) -> int:
            order.append(f"fdo completion {context}")
            return STATUS_SUCCESS

        IoSetCompletionRoutine(irp, completion, "ctx")
        return IoCallDriver(device.extension, irp)

    bus.major_function[IRP_MJ.PNP] = pdo_dispatch
    function.major_function[IRP_MJ.PNP] = fdo_dispatch
    pdo = IoCreateDevice(bus, DeviceKind.PDO)
    fdo = IoCreateDevice(function, DeviceKind.FDO)
    fdo.extension = IoAttachDeviceToDeviceStack(fdo, pdo)
    return pdo, fdo


def test_irp_completes_bottom_up_then_reaches_the_originator() -> None:
    order: list[str] = []
    _, fdo = two_level_stack(order)
    irp = Irp.pnp(IRP_MN_PNP.START_DEVICE)
    assert irp.io_status.status == STATUS_NOT_SUPPORTED
    irp.on_complete.append(lambda done: order.append("originator"))
    assert IoCallDriver(fdo, irp) == STATUS_SUCCESS
    assert order == ["fdo dispatch", "pdo dispatch", "fdo completion ctx", "originator"]
    with pytest.raises(BugCheck) as stop:
        IoCompleteRequest(irp)
    assert stop.value.code == BugCheckCode.MULTIPLE_IRP_COMPLETE_REQUESTS


def test_more_processing_required_hands_the_irp_back_and_pending_completion_wakes_the_waiter() -> None:
    order: list[str] = []
    held: list[Irp] = []
    bus = DriverObject("SLOW")

    def pending_dispatch(device: DeviceObject, irp: Irp) -> int:
        held.append(irp)
        return STATUS_PENDING

    bus.major_function[IRP_MJ.PNP] = pending_dispatch
    pdo = IoCreateDevice(bus, DeviceKind.PDO)
    irp = Irp.pnp(IRP_MN_PNP.QUERY_CAPABILITIES)
    # Another thread completes it later, as a DPC on the interrupt thread would.
    timer = threading.Timer(0.05, lambda: (setattr(held[0].io_status, "status", STATUS_SUCCESS),
                                           IoCompleteRequest(held[0])))
    timer.start()
    assert IoSynchronousCallDriver(pdo, irp) == STATUS_SUCCESS
    assert irp.completed and irp.pending_returned
    timer.join()

    stop_here = DriverObject("STOPPER")

    def stopper(device: DeviceObject, irp2: Irp) -> int:
        IoSetCompletionRoutine(irp2, lambda d, i, c: (order.append("mine again"), STATUS_MORE_PROCESSING_REQUIRED)[1])
        IoCallDriver(device.extension, irp2)
        order.append(f"completed={irp2.completed}")
        IoCompleteRequest(irp2)
        return STATUS_SUCCESS

    stop_here.major_function[IRP_MJ.PNP] = stopper
    order2: list[str] = []
    pdo2, _ = two_level_stack(order2)
    top = IoCreateDevice(stop_here, DeviceKind.FILTER)
    top.extension = IoAttachDeviceToDeviceStack(top, pdo2)
    irp2 = Irp.pnp(IRP_MN_PNP.START_DEVICE)
    IoCallDriver(top, irp2)
    assert order == ["mine again", "completed=False"] and irp2.completed


def test_forward_passes_unhandled_pnp_irps_with_not_supported() -> None:
    bus, filt = DriverObject("BUS"), DriverObject("FILT")

    def pdo_leaves_status(device: DeviceObject, irp: Irp) -> int:
        status = irp.io_status.status
        IoCompleteRequest(irp)
        return status

    bus.major_function[IRP_MJ.PNP] = pdo_leaves_status
    filt.major_function[IRP_MJ.PNP] = lambda device, irp: forward(irp, device.extension)
    pdo = IoCreateDevice(bus, DeviceKind.PDO)
    top = IoCreateDevice(filt, DeviceKind.FILTER)
    top.extension = IoAttachDeviceToDeviceStack(top, pdo)
    irp = Irp.pnp(IRP_MN_PNP.QUERY_PNP_DEVICE_STATE)
    assert IoSynchronousCallDriver(top, irp) == STATUS_NOT_SUPPORTED
    no_handler = Irp(IRP_MJ.DEVICE_CONTROL)
    IoCallDriver(pdo, no_handler)
    assert no_handler.io_status.status == 0xC0000010  # STATUS_INVALID_DEVICE_REQUEST


def test_query_interface_at_dispatch_bugchecks_naming_the_sending_module(cpu: Processor) -> None:
    kernel = Kernel(seed=42).activate()
    bus = DriverObject("XENBUS")
    bus.major_function[IRP_MJ.PNP] = lambda device, irp: STATUS_SUCCESS
    pdo = IoCreateDevice(bus, DeviceKind.PDO)
    child = DriverObject("XENVIF")
    kernel.log.print("xenvif", "PdoQueryInterface: sending at DISPATCH")

    def child_dpc(dpc: KDpc, context: Any, a1: Any, a2: Any) -> None:
        irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE,
                      QueryInterfaceParameters(uuid.UUID("86824C3B-D34E-4753-B281-2F1E3AD214D7"), 64, 2, object()))
        IoCallDriver(pdo, irp)

    with pytest.raises(BugCheck) as stop:
        dpc = KeInitializeDpc(child_dpc, module=child.module)
        KeInsertQueueDpc(dpc)  # queued at PASSIVE: runs at once, at DISPATCH
    assert stop.value.code == BugCheckCode.DRIVER_IRQL_NOT_LESS_OR_EQUAL
    assert stop.value.module == "xenvif.sys" and stop.value.irql == DISPATCH_LEVEL
    dump = kernel.crash_dump(stop.value)
    assert dump.module == "xenvif.sys" and dump.seed == 42
    assert dump.param_notes[0] == "IRP_MN_QUERY_INTERFACE"
    assert "child_dpc" in dump.traceback and "XENVIF|PdoQueryInterface" in dump.debug_log[-1]
    assert "*** xenvif.sys - IRP_MN_QUERY_INTERFACE at DISPATCH_LEVEL" in dump.stop_screen()


def test_dpc_queued_by_an_isr_runs_at_dispatch_after_the_isr_returns() -> None:
    seen: list[tuple[str, int]] = []
    dpc = KeInitializeDpc(lambda d, ctx, a1, a2: seen.append((f"dpc {a1}", KeGetCurrentIrql())), module="xenbus.sys")

    def isr(interrupt: KInterrupt, context: Any) -> bool:
        seen.append(("isr", KeGetCurrentIrql()))
        assert KeInsertQueueDpc(dpc, "port 3")
        assert not KeInsertQueueDpc(dpc)  # already queued
        seen.append(("isr end", KeGetCurrentIrql()))
        return True

    interrupt = IoConnectInterrupt(isr, module="xenbus.sys")
    interrupt.fire()
    assert seen == [("isr", interrupt.irql), ("isr end", interrupt.irql), ("dpc port 3", DISPATCH_LEVEL)]
    assert KeGetCurrentIrql() == PASSIVE_LEVEL and interrupt.claimed == 1


def test_interrupt_above_current_irql_is_held_until_the_irql_drops() -> None:
    seen: list[str] = []
    interrupt = IoConnectInterrupt(lambda i, c: seen.append("isr") or True, module="xenbus.sys")
    old = KeRaiseIrql(HIGH_LEVEL)
    interrupt.fire()
    assert seen == []
    KeLowerIrql(old)
    assert seen == ["isr"]


def test_interrupt_thread_is_serialised_by_the_kernel_lock(cpu: Processor) -> None:
    done = KEvent("isr ran")
    interrupt = IoConnectInterrupt(lambda i, c: done.set() or True, module="xenbus.sys")
    with cpu.lock:
        worker = threading.Thread(target=interrupt.fire)
        worker.start()
        worker.join(0.05)
        assert worker.is_alive() and not done.read_state()  # blocked while driver code runs
    worker.join(2)
    assert done.read_state()


def test_wait_above_apc_level_bugchecks() -> None:
    KeRaiseIrql(DISPATCH_LEVEL)
    from xenpv.stack.kernel import KeWaitForSingleObject
    with pytest.raises(BugCheck) as stop:
        KeWaitForSingleObject(KEvent("x"), 1.0)
    assert stop.value.param_notes[0] == "KeWaitForSingleObject"
