"""The Windows kernel semantics the PV drivers depend on: IRQL and spin locks, bugchecks and crash dumps,
the debug log, the registry, IRPs and device stacks, the PnP and power managers, interrupts and DPCs.

Names mirror Windows (KeRaiseIrql, IoCallDriver, IRP_MN_PNP.QUERY_INTERFACE...) so that driver code
reads like the C drivers; each module's docstring says what is modelled and what is simplified.
"""
from .bugcheck import (BUG, BUG_ON, BugCheck, BugCheckCode, CrashDump, KeBugCheckEx, KeDeregisterBugCheckCallback,
                       KeRegisterBugCheckCallback, address_of, bugcheck_name)
from .debuglog import DbgLevel, DbgPrint, DbgPrintEx, DebugLog, DebugRecord, current_log
from .device import (DeviceKind, DeviceObject, DriverObject, IoAttachDeviceToDeviceStack, IoCreateDevice,
                     IoDeleteDevice, IoDetachDevice, IoGetAttachedDevice, device_stack)
from .dpc import (IoConnectInterrupt, IoDisconnectInterrupt, KDpc, KeInitializeDpc, KeInsertQueueDpc,
                  KeRemoveQueueDpc, KeSynchronizeExecution, KInterrupt)
from .event import KEvent, KeClearEvent, KeSetEvent, KeWaitForSingleObject
from .irp import (DEVICE_POWER_STATE, IRP_MJ, IRP_MN_PNP, IRP_MN_POWER, POWER_ACTION, POWER_STATE_TYPE,
                  SYSTEM_POWER_STATE, BusQueryIdType, DeviceCapabilities, DeviceControlParameters,
                  DeviceRelationType, IoCallDriver, IoCompleteRequest, IoCopyCurrentIrpStackLocationToNext,
                  IoMarkIrpPending, IoSetCompletionRoutine, IoSkipCurrentIrpStackLocation, IoStatusBlock,
                  IoSynchronousCallDriver, Irp, PowerParameters, QueryCapabilitiesParameters,
                  QueryDeviceRelationsParameters, QueryIdParameters, QueryInterfaceParameters, forward)
from .irql import (APC_LEVEL, DIRQL, DISPATCH_LEVEL, HIGH_LEVEL, PASSIVE_LEVEL, KernelLock, KeAcquireSpinLock,
                   KeAcquireSpinLockAtDpcLevel, KeGetCurrentIrql, KeLowerIrql, KeRaiseIrql, KeReleaseSpinLock,
                   KeReleaseSpinLockFromDpcLevel, KSpinLock, Processor, assert_max_irql, assert_passive,
                   current_processor)
from .pnp import (CmProblem, DeviceNode, DeviceNodeState, DriverCatalog, DriverMatch, InMemoryCatalog,
                  IoInvalidateDeviceRelations, PnpManager)
from .power import D0, D3, S0, S3, S4, S5, PoCallDriver, PoRequestPowerIrp, PoStartNextPowerIrp, PowerManager
from .registry import (REG_BINARY, REG_DWORD, REG_MULTI_SZ, REG_QWORD, REG_SZ, KeyNotFound, Registry,
                       RegistryError, RegType, RegValue, ValueNotFound, ValueTypeMismatch)
from .status import NT_SUCCESS, NTSTATUS, status_name
from .system import Kernel

__all__ = [name for name in dir() if not name.startswith("_")]
