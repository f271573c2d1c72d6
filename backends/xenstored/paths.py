"""Path validation and canonicalisation (core.c canonicalize / is_valid_nodename)."""
from __future__ import annotations

import re

from xenpv.backends.xenstored.errors import XsError
from xenpv.xenabi.xs_wire import XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX

_VALID = re.compile(rb"[A-Za-z0-9\-/_@]+")
_LOCAL_PREFIX = re.compile(r"/local/domain/\d{1,5}/")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def canonicalize(raw: bytes, implicit: str, *, allow_special: bool = False,
                 path_quota: int | None = None) -> str:
    """Return the absolute path for `raw` (relative paths hang below `implicit`), or raise EINVAL.

    `path_quota` is the unprivileged path-length quota, counted after `/local/domain/N/` as cxenstored does.
    """
    if not raw or _VALID.fullmatch(raw) is None:
        raise XsError("EINVAL", f"bad characters or empty path {raw[:64]!r}")
    first = raw[0]
    if first == 0x40:  # '@': special watch paths, only where the request type allows them
        if not allow_special:
            raise XsError("EINVAL", f"special path not allowed here: {raw[:64]!r}")
        if len(raw) > XENSTORE_REL_PATH_MAX:
            raise XsError("EINVAL", "special path too long")
        return raw.decode("ascii")
    if first != 0x2F:
        if len(raw) > XENSTORE_REL_PATH_MAX:
            raise XsError("EINVAL", "relative path too long")
        path = f"{implicit}/{raw.decode('ascii')}"
    else:
        path = raw.decode("ascii")
    if len(path) > 1 and path[-1] == "/":
        raise XsError("EINVAL", f"trailing slash in {path[:64]!r}")
    if "//" in path:
        raise XsError("EINVAL", f"empty component in {path[:64]!r}")
    if len(path) > XENSTORE_ABS_PATH_MAX:
        raise XsError("EINVAL", "path too long")
    if path_quota is not None:
        m = _LOCAL_PREFIX.match(path)
        if len(path) - (m.end() if m else 0) > path_quota:
            raise XsError("EINVAL", "path exceeds the domain's path-length quota")
    return path


def parent_of(path: str) -> str:
    cut = path.rfind("/")
    return "/" if cut <= 0 else path[:cut]


def basename(path: str) -> str:
    return path[path.rfind("/") + 1:]


def is_at_or_below(path: str, top: str) -> bool:
    """True if `path` is `top` or inside its subtree."""
    if top == "/":
        return True
    return path == top or (path.startswith(top) and path[len(top)] == "/")


def depth_below(path: str, top: str) -> int:
    """Number of components of `path` below `top` (0 for `top` itself); `path` must be at or below `top`."""
    if path == top:
        return 0
    if top == "/":
        return path.count("/")
    return path.count("/", len(top))
