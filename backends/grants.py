"""Grant access of a dom0 back-end process: check, pin and copy granted pages itself, on the guest RAM its
vhost-user link maps, without a round trip to xenhv per access.

xenhv hands the back-end (control op ``gnttab_share``) the domain's grant frames and its pin table, and a
party id in that table; pins follow Xen's rules and are counted where xenhv sees them (xenabi.grant_pins),
so the guest's revoke, a dead back-end's pins and the domain's destruction stay xenhv's business.  What
only xenhv can decide (a frame that is a hypervisor page placed in the guest's physical map, or not a page
at all) goes through xenhv's map and unmap as before, and so does everything when xenhv has no party left.
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from xenpv.backends.vhost_user.memory import GuestMemoryError
from xenpv.backends.xenhv.control import XenhvError
from xenpv.base.errors import HarnessError
from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.grant_entries import atomic_frame
from xenpv.xenabi.grant_pins import MAP_MASK, GrantNotLocal, GrantRefused, PinTable
from xenpv.xenabi.grant_table import GNTST_NAMES
from xenpv.xenabi.ring import XEN_PAGE_SIZE

if TYPE_CHECKING:
    from xenpv.backends.xenbackend import DomainLink, XenBackend

T = TypeVar("T")

log = logging.getLogger("grants")

# dom0's back-ends map as dom0: a grant is theirs when its entry's domid is 0.
BACKEND_DOMID = 0


class GrantAccessError(HarnessError):
    """A grant the guest named cannot be accessed as asked (the message says which rule refused it)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class BackendGrants:
    """Grant access for one back-end's link to one domain.  Thread-safe (pins are atomic in shared memory).

    ``xenhv_calls`` counts what still went to xenhv, so benchmarks can report it per frame."""

    def __init__(self, backend: "XenBackend", link: "DomainLink") -> None:
        self.backend, self.link, self.domid = backend, link, link.domid
        self.xenhv_calls = 0
        self._pins: PinTable | None = None
        self._maps: list[mmap.mmap] = []
        self._frames: list[AtomicMemory] = []
        try:
            shared = backend.call("gnttab_share", domid=self.domid, backend=backend.name)
        except XenhvError as exc:
            log.warning("dom%d: xenhv does not share grant pins (%s); every grant access goes through xenhv",
                        self.domid, exc)
            return
        fds = shared["fds"]
        try:
            frames_fd, pins_fd = fds
            hv = mmap.mmap(frames_fd, shared["hv_frames"] * XEN_PAGE_SIZE, mmap.MAP_SHARED)
            self._maps.append(hv)
            pins = mmap.mmap(pins_fd, os.fstat(pins_fd).st_size, mmap.MAP_SHARED)
            self._maps.append(pins)
            base = shared["grant_frame_base"]
            with memoryview(hv) as view:
                self._frames = [atomic_frame(view[(base + i) * XEN_PAGE_SIZE:(base + i + 1) * XEN_PAGE_SIZE])
                                for i in range(shared["max_grant_frames"])]
            self._pins = PinTable(memoryview(pins), self._frames, self.domid)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self._party, self._generation = shared["party"], shared["generation"]

    @property
    def local(self) -> bool:
        """Whether pins are taken here (False: every access is a call to xenhv)."""
        return self._pins is not None

    def close(self) -> None:
        """Drop the shared tables; no access may be in progress (the owner stops its threads first)."""
        pins, self._pins = self._pins, None
        if pins is not None:
            pins.release()
        for frame in self._frames:
            frame.release()
        self._frames = []
        for m in self._maps:
            m.close()
        self._maps = []

    # ---- pins --------------------------------------------------------------------------------------------

    def pin(self, ref: int, writable: bool) -> tuple[int, int | None]:
        """Pin ``ref``: (its frame, xenhv's handle when xenhv holds the mapping).  Pair with :meth:`unpin`.

        A pin here is one native call (xenabi.grant_pins), page check included: the frame must be guest RAM
        that no hypervisor page covers, the RAM this link maps; any other frame is xenhv's to decide."""
        pins = self._pins
        if pins is not None:
            try:
                return pins.pin(self._party, ref, writable, BACKEND_DOMID, mask=MAP_MASK, op="map",
                                generation=self._generation), None
            except GrantNotLocal:
                pass  # xenhv decides
            except GrantRefused as exc:
                raise GrantAccessError(f"dom{self.domid} ref {ref}: {exc} ({GNTST_NAMES.get(exc.status)})",
                                       exc.status) from None
        self.xenhv_calls += 1
        try:
            m = self.backend.call("gnttab_map", domid=self.domid, ref=ref, readonly=not writable)
        except XenhvError as exc:
            raise GrantAccessError(f"dom{self.domid} ref {ref}: {exc}", exc.gntst) from exc
        return m["gfn"], m["handle"]

    def unpin(self, ref: int, writable: bool, handle: int | None) -> None:
        if handle is not None:
            self.xenhv_calls += 1
            self.backend.call("gnttab_unmap", handle=handle)
            return
        pins = self._pins
        if pins is None:
            raise GrantAccessError(f"dom{self.domid} ref {ref}: the pin table was closed under a pin")
        pins.unpin(self._party, ref, writable, generation=self._generation)

    @contextlib.contextmanager
    def page(self, ref: int, writable: bool) -> Iterator[memoryview]:
        """The granted page, pinned while the block runs (the view is released at its end)."""
        gfn, handle = self.pin(ref, writable)
        try:
            view = self._page_view(ref, gfn)
            try:
                yield view
            finally:
                view.release()
        finally:
            self.unpin(ref, writable, handle)

    def _page_view(self, ref: int, gfn: int) -> memoryview:
        try:
            return self.link.memory.view(gfn << 12, XEN_PAGE_SIZE)
        except GuestMemoryError as exc:
            raise GrantAccessError(f"dom{self.domid} ref {ref}: gfn {gfn:#x}: {exc}") from exc

    # ---- copies ------------------------------------------------------------------------------------------

    def _on_page(self, ref: int, writable: bool, use: Callable[[memoryview], T]) -> T:
        """:meth:`page` without the generator: every forwarded frame takes this path, and a generator-based
        context manager costs as much as the pin itself."""
        gfn, handle = self.pin(ref, writable)
        try:
            view = self._page_view(ref, gfn)
            try:
                return use(view)
            finally:
                view.release()
        finally:
            self.unpin(ref, writable, handle)

    def read(self, ref: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the page ``ref`` grants (Xen's GNTTABOP_copy from a grant)."""
        _check_span(ref, offset, size)
        return self._on_page(ref, False, lambda page: bytes(page[offset:offset + size]))

    def write(self, ref: int, offset: int, data: bytes | memoryview) -> None:
        """Copy ``data`` to ``offset`` of the page ``ref`` grants; a read-only grant is refused."""
        _check_span(ref, offset, len(data))

        def copy(page: memoryview) -> None:
            page[offset:offset + len(data)] = data
        self._on_page(ref, True, copy)


def _check_span(ref: int, offset: int, size: int) -> None:
    if offset < 0 or size < 0 or offset + size > XEN_PAGE_SIZE:
        raise GrantAccessError(f"ref {ref}: {size} bytes at offset {offset} go beyond the page")
