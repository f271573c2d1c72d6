"""vhost-user, both roles (QEMU docs/interop/vhost-user.rst).

- `messages`: header, payload layouts, request ids, feature bits, framing with SCM_RIGHTS fds.
- `memory`: guest memory regions mapped by a back-end, addressed by guest-physical address.
- `backend`: the back-end server library (xenstored's ring transport, blkback, netback).
- `frontend`: the front-end (xenhv) that hands back-ends guest RAM and event-channel eventfds.
"""
from xenpv.backends.vhost_user.backend import BackendDevice, BackendSession, VhostUserBackend, Vring, VringAddr
from xenpv.backends.vhost_user.frontend import DEFAULT_PROTOCOL_FEATURES, Region, VhostUserFrontend
from xenpv.backends.vhost_user.memory import GuestMemory, GuestMemoryError, RegionDescriptor
from xenpv.backends.vhost_user.messages import (
    F_PROTOCOL_FEATURES,
    Message,
    ProtocolFeature,
    Request,
    VhostUserDisconnected,
    VhostUserError,
    VhostUserProtocolError,
    VhostUserRequestFailed,
    VhostUserTimeout,
)

__all__ = [
    "BackendDevice",
    "BackendSession",
    "DEFAULT_PROTOCOL_FEATURES",
    "F_PROTOCOL_FEATURES",
    "GuestMemory",
    "GuestMemoryError",
    "Message",
    "ProtocolFeature",
    "Region",
    "RegionDescriptor",
    "Request",
    "VhostUserBackend",
    "VhostUserDisconnected",
    "VhostUserError",
    "VhostUserFrontend",
    "VhostUserProtocolError",
    "VhostUserRequestFailed",
    "VhostUserTimeout",
    "Vring",
    "VringAddr",
]
