"""The historical bug catalogue: switches that put a BSOD-class defect of the real PV drivers back into the
model (reference windows-pv-drivers.md section 9), each named `<driver>-<upstream commit>` after the
commit that fixed it.

A switch is off unless the guest turns it on: `bugs: [xenbus-0250399, ...]` in the guest YAML (checked
against this catalogue by guests.schema), or a non-zero DWORD of the switch's name under `BUGS_KEY` in the
guest's registry (read at every boot, as the drivers read their Parameters keys; the console's `reg add`
sets one for the next boot). With a switch on, the modelled driver function takes the branch the
upstream code had before the fix; the STOP then comes from the kernel model's own rules (IRQL checks,
pool checks, wait checks, memory access checks), never from the switch itself.

This is the one table of switches: stack.drivers.bugs answers "is this switch on" for the drivers, the
README's "Historical bug catalogue" section lists the same rows (a unit test keeps them equal), and
tests/integration/test_bug_catalogue.py runs each row's scenario with the switch on (the STOP, module
and function below) and off (the scenario passes).

It sits beside the schema (the floor below stack/) so that the schema can validate names against it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# A switch turned on through the registry: REG_DWORD <switch name> = 1 under this key (HKLM\SOFTWARE,
# where a test harness's own settings go; no Windows component reads it).
BUGS_KEY = r"HKLM\SOFTWARE\XenpvHarness\BugSwitches"

_NAME_RE = re.compile(r"^(xen|xenbus|xenfilt|xenvif|xenvbd|xennet|xeniface)-[0-9a-f]{7}$")


@dataclass(frozen=True)
class BugSwitch:
    """One historical defect the model can express.

    `stop` is the bugcheck code the harness must report with the switch on, `module` the image it blames
    and `function` the model function the STOP names (the faulting function of the dump's bucket).
    `bucket` is the crash bucket the dump must carry (stack.kernel.bucket's rule, README "Crash dumps,
    buckets and replays"). `why` says how that STOP follows from the defect (from the commit message where
    it names one, else derived from the kind of fault and the IRQL it happens at)."""

    name: str
    repository: str
    commit: str
    date: str
    stop: int
    stop_name: str
    module: str
    function: str
    bucket: str
    defect: str
    scenario: str
    why: str

    @property
    def short(self) -> str:
        return self.commit[:7]


def _switches(*switches: BugSwitch) -> dict[str, BugSwitch]:
    table: dict[str, BugSwitch] = {}
    for s in switches:
        if not _NAME_RE.match(s.name) or not s.name.endswith(s.short):
            raise ValueError(f"bug switch {s.name!r}: must be <driver>-<first 7 digits of {s.commit}>")
        if s.name in table:
            raise ValueError(f"bug switch {s.name!r} listed twice")
        table[s.name] = s
    return table


CATALOGUE: dict[str, BugSwitch] = _switches(
    BugSwitch(
        name="xenbus-0250399", repository="xcp-ng/win-xenbus", commit="0250399a8151388188ebd345d02e18a527e7d4c9",
        date="2020-03-04", stop=0xD1, stop_name="DRIVER_IRQL_NOT_LESS_OR_EQUAL", module="xenbus.sys",
        function="StoreInterface.StorePollLocked",
        bucket="0xD1_xenbus!StoreInterface.StorePollLocked+irql-dispatch",
        defect="StoreRelease called StoreDisable (closes and NULLs the store event channel) before "
               "StorePollLocked, which reads the channel's count through the NULL pointer",
        scenario="hibernate (power S4): the children, then the XENBUS FDO, release STORE on the way to D3; "
                 "the last release runs StoreRelease",
        why="the commit names a D1: the NULL read happens under the store's spin lock, at DISPATCH_LEVEL"),
    BugSwitch(
        name="xenbus-55384e7", repository="xcp-ng/win-xenbus", commit="55384e7f2a1f7861bbe90878a9c1b6707bf2eb68",
        date="2016-05-12", stop=0xC2, stop_name="BAD_POOL_CALLER", module="xenbus.sys",
        function="EvtchnInterface.HashTableRemove",
        bucket="0xC2_xenbus!EvtchnInterface.HashTableRemove",
        defect="the EVTCHN EARLY suspend callback unhashes every channel, and the hash table freed each node "
               "in place: at HIGH_LEVEL with interrupts off, where pool can be neither allocated nor freed",
        scenario="a PV disk connects (its ring has an event channel); a local migration resumes the guest in "
                 "a new domain, where the EARLY callbacks run",
        why="ExFreePoolWithTag above DISPATCH_LEVEL: BAD_POOL_CALLER 0x09 (free at an invalid IRQL); the "
            "commit feared memory corruption, a checked pool stops at once"),
    BugSwitch(
        name="xenbus-080720a", repository="xcp-ng/win-xenbus", commit="080720ac3fce2eeec9ca430bf44e0f9833d049cd",
        date="2019-09-16", stop=0x7E, stop_name="SYSTEM_THREAD_EXCEPTION_NOT_HANDLED", module="xen.sys",
        function="Xen.HypercallCall",
        bucket="0x7E_xen!Xen.HypercallCall",
        defect="outside Xen the hypercall page is never populated, yet XenVersion (from DllInitialize and "
               "XenTouch) calls through it instead of failing with STATUS_NOT_IMPLEMENTED",
        scenario="boot a disk with the PV drivers installed on a machine without Xen (no platform device)",
        why="executing the page's zeroes faults with an access violation (0xC0000005) at PASSIVE_LEVEL in the "
            "boot thread, which has no handler for it: 0x7E"),
    BugSwitch(
        name="xennet-0e04a15", repository="xcp-ng/win-xennet", commit="0e04a15e00b799715143427607467a64cd8a9c68",
        date="2024-03-26", stop=0xD1, stop_name="DRIVER_IRQL_NOT_LESS_OR_EQUAL", module="xenbus.sys",
        function="SuspendInterface.SuspendDeregister",
        bucket="0xD1_xenbus!SuspendInterface.SuspendDeregister+irql-dispatch",
        defect="AdapterDisable asserted Enabled instead of returning when the adapter is already disabled; "
               "MiniportShutdownEx after MiniportPause disables twice and deregisters the SUSPEND callback "
               "whose handle the first call set to NULL",
        scenario="a second reboot (the first unplugs the emulated NIC, so the miniport starts on boot 2): NDIS "
                 "pauses the miniport for the Sx IRP, then calls MiniportShutdownEx",
        why="SUSPEND.Deregister unlinks the NULL callback under its spin lock, at DISPATCH_LEVEL: 0xD1 in "
            "xenbus.sys, the commit's 'bugcheck'"),
    BugSwitch(
        name="xenvbd-667456d", repository="xcp-ng/win-xenvbd", commit="667456d5dd390c6b3cab60a34a1600b49de42b12",
        date="2014-04-22", stop=0x0C, stop_name="MAXIMUM_WAIT_OBJECTS_EXCEEDED", module="xenvbd.sys",
        function="XenvbdTarget.TargetDestroy",
        bucket="0xC_xenvbd!XenvbdTarget.TargetDestroy",
        defect="PdoDestroy (TargetDestroy since) waited for its 4 list-empty events with KeWaitForMultipleObjects and no wait "
               "block array; the thread's built-in blocks cover THREAD_WAIT_OBJECTS (3)",
        scenario="a PV disk with no emulated twin connects on the first boot; reboot destroys its target",
        why="KeWaitForMultipleObjects stops the system with 0xC when Count > THREAD_WAIT_OBJECTS and "
            "WaitBlockArray is NULL"),
    BugSwitch(
        name="xenvbd-9f7f8b2", repository="xcp-ng/win-xenvbd", commit="9f7f8b221516c51e23beeda516fe5d37dfb12a6b",
        date="2018-09-26", stop=0x50, stop_name="PAGE_FAULT_IN_NONPAGED_AREA", module="xenvbd.sys",
        function="XenvbdTarget.RingDestroy",
        bucket="0x50_xenvbd!XenvbdTarget.RingDestroy",
        defect="FrontendDestroy zeroed MaxQueues before RingDestroy, whose `while (--Index > 0)` then starts "
               "at 0xFFFFFFFF and reads Ring->Ring[0xFFFFFFFE], far beyond the array",
        scenario="a PV disk with no emulated twin connects on the first boot; reboot destroys its target",
        why="the read lands on no mapped page at PASSIVE_LEVEL in the kernel address space: 0x50"),
    BugSwitch(
        name="xenvbd-4a32464", repository="xcp-ng/win-xenvbd", commit="4a32464d0175784c03551ef1827c3a6507f9819e",
        date="2017-10-02", stop=0xC2, stop_name="BAD_POOL_CALLER", module="xenvbd.sys",
        function="Base64Free",
        bucket="0xC2_xenvbd!Base64Free",
        defect="Base64Free passed its buffer to ExFreePoolWithTag without a NULL check; FrontendDisconnect frees "
               "the page 0x80/0x83 inquiry overrides, which are NULL when the backend has no sm-data",
        scenario="a PV disk with no emulated twin connects on the first boot (blkback writes no sm-data); "
                 "reboot (the commit's 'BSOD on shutdown') disconnects it",
        why="ExFreePoolWithTag is not NULL-safe; NULL is below the system address space: BAD_POOL_CALLER "
            "0x40 (free of a user-mode address)"),
    BugSwitch(
        name="xeniface-1019522", repository="xcp-ng/win-xeniface", commit="1019522273c7080d73885e38e972092df4fcce0f",
        date="2024-03-07", stop=0xD5, stop_name="DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL", module="xeniface.sys",
        function="IoctlGnttabPermitForeignAccess",
        bucket="0xD5_xeniface!IoctlGnttabPermitForeignAccess",
        defect="GnttabPermitForeignAccess zeroed and freed the request's XENIFACE_GNTTAB_CONTEXT on its failure "
               "path, which IoctlGnttabPermitForeignAccess zeroes and frees again when it sees the failure",
        scenario="a user-mode grant (IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS, RequestId 1), then a second "
                 "with the same RequestId in the same process, which GnttabPermitForeignAccess refuses",
        why="the caller's RtlZeroMemory writes to the freed context; the model's pool is special pool (Driver "
            "Verifier, as an HLK run has it), which unmaps a freed block: 0xD5 in xeniface.sys (the commit's "
            "'kernel heap corruption' without the verifier)"),
)


# Section 9 rows the model cannot express (yet), with the reason; the README lists them under the table.
# Each was read upstream (the commit, or the report) before it was put here.
NOT_EXPRESSED: dict[str, str] = {
    "xenbus-633403e": "transaction check raced a suspend: the window lies between two steps of "
                      "StoreTransactionEnd that hold the model's one processor throughout (no preemption there)",
    "xenbus-08def99": "emulated devices back after migration: no STOP (the emulated disk and NIC reappear in "
                      "the new QEMU); a catalogue row needs one",
    "xenbus-124869c": "PdoSuspend with the FDO in D3 (XENVIF 5b89542): the model's PnP manager has no "
                      "rebalance (STOP_DEVICE) and removes no child while the FDO is in D3",
    "xenfilt-6ac33ae": "list walk stuck on a missing PDO: the model never sees an emulated device vanish "
                       "after boot (no ACPI eject), so no exposed filter PDO goes missing",
    "xenbus-bfcf8f7": "stale unplug keys with rebinding children: lives in the co-installer of the 2015-2023 "
                      "era, which the installer model does not carry (it has the subscriber and current eras)",
    "xenbus-b7dcbf9": "MDL use-after-free in __FdoFreeBuffer: runs only when the active XENBUS FDO is "
                      "removed, which no model scenario does",
    "xenbus-2025-08": "boot chain missing from the driver store: the installer model keeps every image",
    "xenvif-2a70618": "backend path re-acquired on resume while CLOSED: the model's XENVIF PDO start walks "
                      "the frontend to CONNECTED and registers its LATE callback only once ENABLED (upstream: "
                      "FrontendResume registers it at every PDO resume and walks to CLOSED, which releases the "
                      "backend path), so no CLOSED frontend without a backend path meets a resume",
    "xenvif-2e9aff5": "UNPLUG held across S3/S4: not a STOP (FdoS3ToS4 allows UNPLUG references)",
    "xenvbd-8f6df40": "Initialized transition on resume: the model creates and starts a target in one step "
                      "on the adapter thread, so no suspend finds one still INITIALIZED",
    "xenvbd-3eef364": "PDO vanished mid-enumeration in XENDISK: the disk filter is not modelled",
    "xenvbd-6b697d1": "crash kernel grant refs >= 32: no STOP in the model's xencrsh path, where no XENBUS "
                      "grant is live (FdoS3ToS4 requires GNTTAB unreferenced) and crash dumps do not go "
                      "through the disk",
    "xennet-4abbd6f": "NBL completed while its next NB is sent: needs a completion on another processor while "
                      "TransmitterSendNetBufferLists runs at DISPATCH_LEVEL; the model has one vCPU",
    "xennet-9278ceb": "next NB read after its NBL completed: the same race as 4abbd6f (one vCPU)",
    "xeniface-fa2c84a": "evtchn DPC use-after-free: the window (a DPC queued just before Close returns, run "
                        "before KeFlushQueuedDpcs drains it) needs a second processor; the model has one vCPU",
    "xcp-ng/xcp#402": "field report, 0x139/0x1E on 8.2.2: the thread names no defect to put back",
    "QubesOS/qubes-issues#10779": "field report, 0x7B with the PV disk driver on Windows 10 LTSC 2021: "
                                  "undiagnosed upstream",
}


def unknown_switch_message(name: object) -> str:
    """What a guest file or the registry is told about a name that is no switch."""
    return f"no bug switch named {name!r} (known: {', '.join(sorted(CATALOGUE))})"
