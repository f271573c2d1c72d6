"""XENBUS STORE interface v2 (reference windows-pv-drivers.md 1 and 7): xenstore over the guest's ring.

Every request goes over the platform's GuestXenstore (the real xs_wire protocol on the ring page, the
store event channel through xenhv). Paths are "<Prefix>/<Node>" or Node alone; relative paths are the
domain's own (/local/domain/<id>/...), as xenstored resolves them. Values come back in buffers the
client gives back with Free; Directory's buffer is the children's names, each NUL-terminated, followed
by a final NUL.

Watches: WatchAdd(Prefix, Node, KEVENT) registers a token with xenstored; a watch thread takes the
ring's WATCH_EVENT messages and sets the client's KEVENT (xenstored fires once at registration too,
as on Windows). While STORE is acquired it owns the platform connection's watch events; events for
tokens it did not issue are logged and dropped.

xenstored errors become NTSTATUS values (ENOENT -> STATUS_OBJECT_NAME_NOT_FOUND, EACCES ->
STATUS_ACCESS_DENIED, EAGAIN -> STATUS_RETRY, ...).

Suspend (store.c StoreSuspendCallbackEarly/Late): on EARLY open transactions and watches become inactive
(a transaction's end answers STATUS_RETRY; an inactive watch never fires again and its removal sends no
UNWATCH: the new domain's xenstored never had it). On LATE the connection is rebuilt for the domain the
guest runs in now (StoreDisable, StoreResetResponse, StoreEnable: HVM_PARAM_STORE_EVTCHN read again, the
new port unmasked) and every watch's event is set, so each client notices, removes its watch and adds it
again.

A request waits for xenstored's reply as the driver's StoreSubmitRequest does, without a timeout of its
own; the connection's deadline (stack.vcpu.xenstore) is the harness's and its expiry, HarnessTooSlow, is
not turned into a status the client would act on.
"""
from __future__ import annotations

import itertools
import logging
import threading
import uuid
from dataclasses import dataclass, field
from enum import IntFlag
from typing import Any

from xenpv.base import threads
from xenpv.stack.drivers import bugs
from xenpv.stack.drivers.interface import Interface, acquire_all
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.drivers.xenbus.debug import DebugCallback, DebugInterface
from xenpv.stack.drivers.xenbus.suspend import SUSPEND_CALLBACK_EARLY, SUSPEND_CALLBACK_LATE, SuspendCallback, SuspendInterface
from xenpv.stack.kernel.assertion import ASSERT
from xenpv.stack.kernel.bugcheck import BUG
from xenpv.stack.kernel.event import KEvent, KeSetEvent
from xenpv.stack.kernel.irql import current_processor
from xenpv.stack.kernel.pool import MmAccess
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_ACCESS_DENIED, STATUS_BUFFER_OVERFLOW, STATUS_INVALID_PARAMETER,
                                 STATUS_NO_MEMORY, STATUS_NOT_IMPLEMENTED, STATUS_OBJECT_NAME_COLLISION,
                                 STATUS_OBJECT_NAME_NOT_FOUND, STATUS_RETRY, STATUS_SUCCESS, STATUS_UNSUCCESSFUL,
                                 NTSTATUS)
from xenpv.stack.timescale import HarnessTooSlow, scaled
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.stack.vcpu.xenstore import XenstoreError
from xenpv.xenabi.xs_wire import XsdSockmsgType as T

log = logging.getLogger("stack.drivers.xenbus.store")

STORE_GUID = uuid.UUID("86824C3B-D34E-4753-B281-2F1E3AD214D7")

# ntstatus.h values stack/kernel/status.py does not name.
STATUS_QUOTA_EXCEEDED = 0xC0000044
STATUS_MEDIA_WRITE_PROTECTED = 0xC00000A2
STATUS_IO_TIMEOUT = 0xC00000B5
STATUS_FILE_IS_A_DIRECTORY = 0xC00000BA
STATUS_UNEXPECTED_IO_ERROR = 0xC00000E9
STATUS_DIRECTORY_NOT_EMPTY = 0xC0000101
STATUS_DEVICE_BUSY = 0x80000011

ERRNO_STATUS: dict[str, int] = {
    "ENOENT": STATUS_OBJECT_NAME_NOT_FOUND,
    "EACCES": STATUS_ACCESS_DENIED,
    "EPERM": STATUS_ACCESS_DENIED,
    "EAGAIN": STATUS_RETRY,
    "EINVAL": STATUS_INVALID_PARAMETER,
    "EEXIST": STATUS_OBJECT_NAME_COLLISION,
    "ENOMEM": STATUS_NO_MEMORY,
    "ENOSPC": STATUS_QUOTA_EXCEEDED,
    "EQUOTA": STATUS_QUOTA_EXCEEDED,
    "E2BIG": STATUS_BUFFER_OVERFLOW,
    "EISDIR": STATUS_FILE_IS_A_DIRECTORY,
    "ENOTEMPTY": STATUS_DIRECTORY_NOT_EMPTY,
    "EROFS": STATUS_MEDIA_WRITE_PROTECTED,
    "EBUSY": STATUS_DEVICE_BUSY,
    "EIO": STATUS_UNEXPECTED_IO_ERROR,
    "ENOSYS": STATUS_NOT_IMPLEMENTED,
}

WATCH_POLL_SECONDS = 0.01

_addresses = itertools.count(0xFFFFE000_01300000, 0x40)


class StorePermissionMask(IntFlag):
    XENBUS_STORE_PERM_NONE = 0
    XENBUS_STORE_PERM_READ = 1
    XENBUS_STORE_PERM_WRITE = 2


XENBUS_STORE_PERM_NONE = StorePermissionMask.XENBUS_STORE_PERM_NONE
XENBUS_STORE_PERM_READ = StorePermissionMask.XENBUS_STORE_PERM_READ
XENBUS_STORE_PERM_WRITE = StorePermissionMask.XENBUS_STORE_PERM_WRITE

# xs_wire's permission letters, by mask.
_PERM_LETTER = {0: "n", 1: "r", 2: "w", 3: "b"}


@dataclass(frozen=True)
class StorePermission:
    """XENBUS_STORE_PERMISSION."""

    Domain: int
    Mask: int


@dataclass(eq=False)
class StoreBuffer:
    Value: bytes
    address: int = field(default_factory=lambda: next(_addresses))


@dataclass(eq=False)
class StoreTransaction:
    Id: int
    Active: bool = True
    address: int = field(default_factory=lambda: next(_addresses))


@dataclass(eq=False)
class StoreWatch:
    Path: str
    Event: KEvent
    Token: str
    Active: bool = True
    address: int = field(default_factory=lambda: next(_addresses))


def errno_to_status(errno: str) -> int:
    return ERRNO_STATUS.get(errno, STATUS_UNSUCCESSFUL)


def _path(prefix: str | None, node: str) -> str:
    return f"{prefix}/{node}" if prefix else node


class StoreInterface(Interface):
    NAME = "STORE"
    GUID = STORE_GUID
    TABLES = LAYOUTS["STORE"]

    def __init__(self, platform: XenPlatform, debug: DebugInterface, suspend: SuspendInterface) -> None:
        super().__init__()
        self.platform = platform
        self.debug = debug
        self.suspend = suspend
        self.buffers: list[StoreBuffer] = []
        self.transactions: list[StoreTransaction] = []
        self.watches: dict[str, StoreWatch] = {}
        self._tokens = itertools.count(1)
        self._watch_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._debug_callback: DebugCallback | None = None
        self._suspend_callbacks: list[SuspendCallback] = []
        # Context->Channel: the store event channel while enabled. The model's is the doorbell of the
        # platform's xenstore connection, which the connection object stands for here.
        self.channel: Any = None

    # -- Acquire/Release --------------------------------------------------------------------------

    def setup(self) -> int:
        status = acquire_all((self.suspend, self.debug))
        if not NT_SUCCESS(status):
            return status
        _, self._debug_callback = self.debug.DebugRegister("XENBUS|STORE", self._dump, None)
        self._suspend_callbacks = [self.suspend.SuspendRegister(SUSPEND_CALLBACK_EARLY, self._suspend_early, None)[1],
                                   self.suspend.SuspendRegister(SUSPEND_CALLBACK_LATE, self._suspend_late, None)[1]]
        self._stopping.clear()
        self._watch_thread = threading.Thread(target=self._run_watches, name="xenbus-store-watch", daemon=True)
        self._watch_thread.start()
        self.StoreEnable()
        return STATUS_SUCCESS

    def teardown(self) -> None:
        if self.watches:
            BUG("OUTSTANDING WATCHES")
        if self.transactions:
            BUG("OUTSTANDING TRANSACTIONS")
        if self.buffers:
            BUG("OUTSTANDING BUFFER")  # store.c StoreRelease
        assert self._watch_thread is not None and self._debug_callback is not None
        self._stopping.set()
        # The thread reads the ring through the platform's store connection: it must be gone before
        # this interface is released and the platform can go. It never takes the processor (it pumps the
        # ring and sets events), so it is joined without giving the processor away: StoreRelease may run
        # at DISPATCH_LEVEL (FdoD0ToD3 raises to it), where no other thread may run driver code.
        threads.join_stopped(self._watch_thread, "XENBUS STORE teardown", scaled(threads.THREAD_EXIT_DEADLINE))
        for callback in self._suspend_callbacks:
            self.suspend.SuspendDeregister(callback)
        self.debug.DebugDeregister(self._debug_callback)
        self._watch_thread, self._debug_callback, self._suspend_callbacks = None, None, []
        self.debug.release()
        self.suspend.release()
        # StoreRelease, under Context->Lock: a last poll for what the ring still holds, then StoreDisable.
        # Before 0250399 the two ran the other way round, so the poll read the channel Disable had NULLed.
        with self._lock.held():
            if bugs.enabled("xenbus-0250399"):
                self.StoreDisable()
                self.StorePollLocked()
            else:
                self.StorePollLocked()
                self.StoreDisable()

    def StoreEnable(self) -> None:
        self.channel = self.platform.store

    def StoreDisable(self) -> None:
        """Close the store event channel and forget it (Context->Channel = NULL)."""
        self.channel = None

    def StorePollLocked(self) -> None:
        """With the lock held: EVTCHN GetCount on the store channel (a read through Context->Channel),
        then whatever requests and responses the ring holds."""
        MmAccess(self.channel, "EVTCHN_CHANNEL.Count")
        self.platform.store.pump()

    def _dump(self, _argument: Any, _crashing: bool) -> None:
        for watch in self.watches.values():
            self.debug.DebugPrintf("WATCH %s: %s", watch.Token, watch.Path)
        for transaction in self.transactions:
            self.debug.DebugPrintf("TRANSACTION %u%s", transaction.Id, "" if transaction.Active else " (inactive)")
        self.debug.DebugPrintf("%u buffers outstanding", len(self.buffers))

    def _suspend_early(self, _argument: Any) -> None:
        for transaction in self.transactions:
            transaction.Active = False
        for watch in self.watches.values():
            watch.Active = False

    def _suspend_late(self, _argument: Any) -> None:
        port = self.platform.reconnect_store()
        log.info("STORE: DISABLE; ENABLE (%d)", port)
        for watch in self.watches.values():
            KeSetEvent(watch.Event)

    # -- watch events -----------------------------------------------------------------------------

    def _run_watches(self) -> None:
        # Non-blocking reads with a sleep between them: a blocking wait_event would hold the connection's
        # lock for its whole timeout and starve the requests of other threads.
        while not self._stopping.is_set():
            try:
                self.platform.store.pump()  # events reach _fire through the watch handlers
            except (AttributeError, OSError, ValueError):
                # The ring went away under us (the platform is closing): nothing more will arrive.
                log.debug("watch thread: store connection closed")
                return
            except HarnessTooSlow as late:
                # The notification trap was not answered in time: the processor stops and the main
                # thread reports it (stack.timescale).
                current_processor().give_up(late)
                return
            self._stopping.wait(WATCH_POLL_SECONDS)

    def _fire(self, path: str, token: str) -> None:
        watch = self.watches.get(token)
        if watch is None:
            log.info("watch event %s for unknown token %r dropped", path, token)
            return
        if not watch.Active:
            return
        log.debug("watch %s fired: %s", token, path)
        KeSetEvent(watch.Event)

    # -- members ----------------------------------------------------------------------------------

    def _request(self, what: str, path: str, operation: Any, *arguments: Any) -> tuple[int, Any]:
        try:
            return STATUS_SUCCESS, operation(*arguments)
        except XenstoreError as error:
            status = errno_to_status(error.errno)
            log.debug("%s %s: %s", what, path, error.errno)
            return status, None

    @staticmethod
    def _tx(transaction: StoreTransaction | None) -> int:
        return 0 if transaction is None else transaction.Id

    def _inactive(self, transaction: StoreTransaction | None) -> bool:
        if transaction is not None and transaction not in self.transactions:
            BUG("UNKNOWN TRANSACTION")
        return transaction is not None and not transaction.Active

    def StoreFree(self, Buffer: StoreBuffer) -> None:
        # store.c StoreFreePayload: ASSERT3U(Buffer->Magic, ==, XENBUS_STORE_BUFFER_MAGIC) stops a checked
        # build on a buffer freed before; the free build's use of freed pool is the model's BUG.
        ASSERT(Buffer in self.buffers, "Buffer->Magic == XENBUS_STORE_BUFFER_MAGIC")
        if Buffer not in self.buffers:
            BUG("UNKNOWN BUFFER")
        self.buffers.remove(Buffer)

    def StoreRead(self, Transaction: StoreTransaction | None, Prefix: str | None,
                  Node: str) -> tuple[NTSTATUS, StoreBuffer | None]:
        if self._inactive(Transaction):
            return STATUS_UNSUCCESSFUL, None
        path = _path(Prefix, Node)
        status, value = self._request("read", path, self.platform.store.read, path, self._tx(Transaction))
        if not NT_SUCCESS(status):
            return status, None
        buffer = StoreBuffer(value)
        self.buffers.append(buffer)
        return STATUS_SUCCESS, buffer

    def StorePrintf(self, Transaction: StoreTransaction | None, Prefix: str | None, Node: str, Format: str,
                    *Arguments: Any) -> NTSTATUS:
        if self._inactive(Transaction):
            return STATUS_UNSUCCESSFUL
        path = _path(Prefix, Node)
        value = Format % Arguments if Arguments else Format
        return self._request("write", path, self.platform.store.write, path, value, self._tx(Transaction))[0]

    def StoreRemove(self, Transaction: StoreTransaction | None, Prefix: str | None, Node: str) -> NTSTATUS:
        if self._inactive(Transaction):
            return STATUS_UNSUCCESSFUL
        path = _path(Prefix, Node)
        return self._request("remove", path, self.platform.store.rm, path, self._tx(Transaction))[0]

    def StoreDirectory(self, Transaction: StoreTransaction | None, Prefix: str | None,
                       Node: str) -> tuple[NTSTATUS, StoreBuffer | None]:
        if self._inactive(Transaction):
            return STATUS_UNSUCCESSFUL, None
        path = _path(Prefix, Node)
        status, names = self._request("directory", path, self.platform.store.directory, path, self._tx(Transaction))
        if not NT_SUCCESS(status):
            return status, None
        buffer = StoreBuffer(b"".join(name.encode() + b"\0" for name in names) + b"\0")
        self.buffers.append(buffer)
        return STATUS_SUCCESS, buffer

    def StorePermissionsSet(self, Transaction: StoreTransaction | None, Prefix: str | None, Node: str,
                            Permissions: list[StorePermission], NumberPermissions: int) -> NTSTATUS:
        if self._inactive(Transaction):
            return STATUS_UNSUCCESSFUL
        if not 0 < NumberPermissions <= len(Permissions):
            return STATUS_INVALID_PARAMETER
        entries = []
        for permission in Permissions[:NumberPermissions]:
            letter = _PERM_LETTER.get(permission.Mask)
            if letter is None:
                return STATUS_INVALID_PARAMETER
            entries.append(f"{letter}{permission.Domain}")
        path = _path(Prefix, Node)
        payload = path.encode() + b"\0" + b"".join(e.encode() + b"\0" for e in entries)
        return self._request("set_perms", path, self.platform.store.request, T.SET_PERMS, payload,
                             self._tx(Transaction), path)[0]

    def StoreTransactionStart(self) -> tuple[NTSTATUS, StoreTransaction | None]:
        status, tx = self._request("transaction_start", "", self.platform.store.transaction_start)
        if not NT_SUCCESS(status):
            return status, None
        transaction = StoreTransaction(tx)
        self.transactions.append(transaction)
        return STATUS_SUCCESS, transaction

    def StoreTransactionEnd(self, Transaction: StoreTransaction, Commit: bool) -> NTSTATUS:
        """Commit (or abort) and forget the transaction; STATUS_RETRY when it conflicted or a suspend
        cut it off, so the client runs it again."""
        ASSERT(Transaction in self.transactions, "Transaction->Magic == STORE_TRANSACTION_MAGIC")
        if Transaction not in self.transactions:
            BUG("UNKNOWN TRANSACTION")
        self.transactions.remove(Transaction)
        if not Transaction.Active:
            return STATUS_RETRY
        return self._request("transaction_end", str(Transaction.Id), self.platform.store.transaction_end,
                             Transaction.Id, Commit)[0]

    def StoreWatchAdd(self, Prefix: str | None, Node: str, Event: KEvent) -> tuple[NTSTATUS, StoreWatch | None]:
        path = _path(Prefix, Node)
        watch = StoreWatch(path, Event, f"TOK{next(self._tokens):08X}")
        # Registered before the request: xenstored fires the initial event as soon as it has the watch.
        self.watches[watch.Token] = watch
        status, _ = self._request("watch", path, self.platform.store.watch, path, watch.Token, self._fire)
        if not NT_SUCCESS(status):
            del self.watches[watch.Token]
            return status, None
        return STATUS_SUCCESS, watch

    def StoreWatchRemove(self, Watch: StoreWatch) -> NTSTATUS:
        ASSERT(self.watches.get(Watch.Token) is Watch, "Watch->Magic == STORE_WATCH_MAGIC")
        if self.watches.get(Watch.Token) is not Watch:
            BUG("UNKNOWN WATCH")
        del self.watches[Watch.Token]
        if not Watch.Active:
            self.platform.store.forget(Watch.Token)
            return STATUS_SUCCESS
        return self._request("unwatch", Watch.Path, self.platform.store.unwatch, Watch.Path, Watch.Token)[0]

    def StorePoll(self) -> None:
        """Process what the ring holds now without waiting (callers spinning at DISPATCH_LEVEL)."""
        self.platform.store.pump()
