"""xenabi against the real Xen public headers (Debian libxen-dev): every layout's size and field offsets and
every constant's value, as gcc sees them.

One C program is generated from the Python definitions, compiled and run; its output is compared group by
group, so a failing case names the layout or module that drifted.  The x86_32 blkif layouts are checked by
compiling the same header for i386 (``gcc -m32 -S``: no 32-bit libc is needed to read the numbers back out of
the assembly).  A name that the headers do not define makes the compile fail, and the error names it.
"""

from __future__ import annotations

import ast
import ctypes
import inspect
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from xenpv.xenabi import blkif, event_channel, grant_table, hvm, netif, ring, unplug, xen
from xenpv.xenabi.layout import field_offsets
from xenpv.xenabi.xenbus import XenbusState

HEADERS = [
    "xen/xen.h", "xen/errno.h", "xen/grant_table.h", "xen/event_channel.h", "xen/memory.h", "xen/sched.h",
    "xen/hvm/params.h", "xen/hvm/hvm_op.h", "xen/hvm/pvdrivers.h", "xen/io/ring.h", "xen/io/blkif.h",
    "xen/io/netif.h", "xen/io/protocols.h", "xen/io/xenbus.h", "xen/io/xs_wire.h",
]
# The newest interface (not the compat one: that renames sched_op/event_channel_op), with the tools-only
# parts visible.
CFLAGS = ["-D__XEN_INTERFACE_VERSION__=__XEN_LATEST_INTERFACE_VERSION__", "-D__XEN_TOOLS__", "-std=gnu11"]

MODULES: list[ModuleType] = [ring, blkif, netif, grant_table, event_channel, xen, hvm]

# Constants that are ours rather than the headers' (protocol facts from docs, Linux or QEMU), with why.
NOT_IN_HEADERS: dict[str, str] = {
    "XEN_PAGE_SIZE": "the public headers hard-code 4096 rather than naming it",
    "BLKIF_SECTOR_SIZE": "blkif.h documents 512-byte sectors in prose only",
    "BLKIF_SECTORS_PER_PAGE": "derived from BLKIF_SECTOR_SIZE",
    "DOMID_ANY": "xenstore's wildcard domid is newer than the Xen 4.17 headers",
    "HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT": "checked through HVM_PARAM_CALLBACK_IRQ_TYPE_MASK below",
}

# Constants we derive from the ABI: the C expression that derives them from the headers.
C_EXPRESSIONS: dict[str, str] = {
    "RING_IDX_MODULUS": "(1ULL << (8 * sizeof(RING_IDX)))",
    "SRING_RING_OFFSET": "offsetof(struct blkif_sring, ring)",
    "BLKIF_SEGS_PER_INDIRECT_FRAME": "(4096 / sizeof(struct blkif_request_segment))",
    "BLKIF_MAX_INDIRECT_SEGMENTS":
        "(4096 / sizeof(struct blkif_request_segment)) * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
    "BLKIF_RING_SIZE": "__CONST_RING_SIZE(blkif, 4096)",
    "NET_TX_RING_SIZE": "__CONST_RING_SIZE(netif_tx, 4096)",
    "NET_RX_RING_SIZE": "__CONST_RING_SIZE(netif_rx, 4096)",
    "GRANT_ENTRIES_V1_PER_FRAME": "(4096 / sizeof(struct grant_entry_v1))",
    "EVTCHN_WORDS": "(sizeof(((struct shared_info *)0)->evtchn_pending) / sizeof(xen_ulong_t))",
    "EVTCHN_WORD_BITS": "(sizeof(xen_ulong_t) * 8)",
}

# xs_wire.py is another module's; these are the names of it that the 4.17 headers define.
XS_WIRE_CONSTANTS = [
    "XENSTORE_PAYLOAD_MAX", "XENSTORE_ABS_PATH_MAX", "XENSTORE_REL_PATH_MAX", "XENSTORE_RING_SIZE",
    "XENSTORE_SERVER_FEATURE_RECONNECTION", "XENSTORE_SERVER_FEATURE_ERROR", "XENSTORE_CONNECTED",
    "XENSTORE_RECONNECT", "XENSTORE_ERROR_NONE", "XENSTORE_ERROR_COMM", "XENSTORE_ERROR_RINGIDX",
    "XENSTORE_ERROR_PROTO", "DOMID_FIRST_RESERVED", "DOMID_SELF", "DOMID_IO", "DOMID_XEN", "DOMID_COW",
    "DOMID_INVALID", "DOMID_IDLE", "GNTTAB_RESERVED_XENSTORE",
]
# Members of struct xenstore_domain_interface that Xen added after 4.17 (Debian 12's libxen-dev): they must
# sit exactly where the 4.17 structure ends.
XS_WIRE_NEWER_FIELDS = ["evtchn_port"]
XS_WIRE_TYPES = [
    "CONTROL", "DIRECTORY", "READ", "GET_PERMS", "WATCH", "UNWATCH", "TRANSACTION_START", "TRANSACTION_END",
    "INTRODUCE", "RELEASE", "GET_DOMAIN_PATH", "WRITE", "MKDIR", "RM", "SET_PERMS", "WATCH_EVENT", "ERROR",
    "IS_DOMAIN_INTRODUCED", "RESUME", "SET_TARGET", "RESET_WATCHES", "DIRECTORY_PART", "INVALID",
]

from xenpv.xenabi import xs_wire


@dataclass(frozen=True)
class Check:
    """One number to compare: ``expected`` from Python, ``c_expr`` evaluated by gcc."""

    group: str
    name: str
    expected: int
    c_expr: str


def _own_int_constants(module: ModuleType) -> dict[str, int]:
    """Module-level ``NAME = <int>`` assignments of ``module`` itself (not names it imports)."""
    tree = ast.parse(inspect.getsource(module))
    names: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if not isinstance(target, ast.Name):
                    continue
                name = target.id
                if name.startswith("_") and not name.startswith("__HYPERVISOR_"):
                    continue
                value = getattr(module, name)
                if isinstance(value, int) and not isinstance(value, bool):
                    names[name] = value
    return names


def _layouts(abi: str) -> list[type[ctypes.Structure]]:
    found: list[type[ctypes.Structure]] = []
    for module in MODULES:
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, ctypes.Structure) and value.__module__ == module.__name__
                    and "_xen_name_" in vars(value) and vars(value).get("_xen_abi_", "native") == abi):
                found.append(value)
    return found


# Layouts that are a prefix of their C type: the C expression for where the prefix ends.
PREFIX_SIZES: dict[str, str] = {
    "SringHeader": "offsetof(struct blkif_sring, ring)",
}


def _layout_checks(layout: type[ctypes.Structure], c_name: str, group: str) -> list[Check]:
    size_expr = PREFIX_SIZES.get(layout.__name__, f"sizeof({c_name})")
    checks = [Check(group, "sizeof", ctypes.sizeof(layout), size_expr)]
    for path, (offset, size) in field_offsets(layout).items():
        checks.append(Check(group, f"{path} offset", offset, f"offsetof({c_name}, {path})"))
        checks.append(Check(group, f"{path} size", size, f"sizeof((({c_name} *)0)->{path})"))
    return checks


def _native_checks() -> list[Check]:
    checks: list[Check] = []
    for layout in _layouts("native"):
        checks += _layout_checks(layout, layout._xen_name_, f"layout {layout.__name__}")
    for module in MODULES:
        group = f"constants {module.__name__}"
        for name, value in _own_int_constants(module).items():
            if name not in NOT_IN_HEADERS:
                checks.append(Check(group, name, value, C_EXPRESSIONS.get(name, name)))
    for state in XenbusState:
        checks.append(Check("constants XenbusState", state.name, int(state), f"XenbusState{state.name}"))
    # The mask's lowest set bit is where the type field starts.
    checks.append(Check("constants xenabi.hvm", "HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT",
                        hvm.HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT, "__builtin_ctzll(HVM_PARAM_CALLBACK_IRQ_TYPE_MASK)"))
    checks.append(Check("xs_wire XSD_SOCKMSG", "size", xs_wire.XSD_SOCKMSG.size, "sizeof(struct xsd_sockmsg)"))
    interface = xs_wire.XenstoreDomainInterface
    group = "xs_wire XenstoreDomainInterface"
    c_name = "struct xenstore_domain_interface"
    checks += [check for check in _layout_checks(interface, c_name, group)
               if check.name != "sizeof" and check.name.split(" ")[0] not in XS_WIRE_NEWER_FIELDS]
    first_new = min(getattr(interface, name).offset for name in XS_WIRE_NEWER_FIELDS)
    checks.append(Check(group, "end of the 4.17 fields", first_new, f"sizeof({c_name})"))
    for name in XS_WIRE_CONSTANTS:
        checks.append(Check("xs_wire constants", name, getattr(xs_wire, name), name))
    for name in XS_WIRE_TYPES:
        checks.append(Check("xs_wire constants", f"XsdSockmsgType.{name}",
                            int(xs_wire.XsdSockmsgType[name]), f"XS_{name}"))
    return checks


def _x86_32_checks() -> list[Check]:
    checks: list[Check] = []
    for layout in _layouts("x86_32"):
        checks += _layout_checks(layout, layout._xen_name_, f"layout {layout.__name__}")
    return checks


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _includes() -> str:
    return "".join(f"#include <{header}>\n" for header in HEADERS)


def _native_program(checks: list[Check]) -> str:
    lines = [
        "#include <errno.h>", "#include <stddef.h>", "#include <stdint.h>", "#include <stdio.h>", _includes(),
        "#define PRODUCT(name, value) printf(\"product\\t%s\\t%d\\n\", name, value);",
        "int main(void) {",
    ]
    for index, check in enumerate(checks):
        lines.append(f'    printf("%d\\t%lld\\t%llu\\n", {index}, (long long)({check.c_expr}), '
                     f"(unsigned long long)({check.c_expr}));")
    lines += ["    PVDRIVERS_PRODUCT_LIST(PRODUCT)", "    return 0;", "}"]
    return "\n".join(lines) + "\n"


def _x86_32_program(checks: list[Check]) -> str:
    # +1 keeps every element non-zero, so gcc emits one ".long" per value instead of folding zeros.
    values = ",\n".join(f"    (unsigned int)({check.c_expr}) + 1u" for check in checks)
    return ("#include <stddef.h>\n#include <stdint.h>\n#include <xen/xen.h>\n#include <xen/io/blkif.h>\n"
            f"const unsigned int xenabi_values[] = {{\n{values}\n}};\n")


def _gcc(args: list[str], cwd: Path) -> None:
    result = subprocess.run(["gcc", *CFLAGS, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.fail(f"gcc {' '.join(args)} failed (a name the headers lack, or a bad field path):\n"
                    f"{result.stderr[-6000:]}", pytrace=False)


@dataclass
class HeaderResults:
    native: dict[int, tuple[int, int]]
    products: dict[str, int]
    x86_32: list[int]


@pytest.fixture(scope="module")
def header_results(tmp_path_factory: pytest.TempPathFactory) -> HeaderResults:
    # ci/bootstrap.sh installs both: their absence is a broken set-up, not a reason to skip.
    assert shutil.which("gcc"), "gcc is not installed"
    assert Path("/usr/include/xen/xen.h").exists(), "libxen-dev headers are not installed (/usr/include/xen/xen.h)"
    workdir = tmp_path_factory.mktemp("xenabi_headers")
    (workdir / "native.c").write_text(_native_program(NATIVE_CHECKS))
    _gcc(["-o", "native", "native.c"], workdir)
    run = subprocess.run([str(workdir / "native")], capture_output=True, text=True, timeout=60, check=True)
    native: dict[int, tuple[int, int]] = {}
    products: dict[str, int] = {}
    for line in run.stdout.splitlines():
        key, first, second = line.split("\t")
        if key == "product":
            products[first] = int(second)
        else:
            native[int(key)] = (int(first), int(second))

    (workdir / "x86_32.c").write_text(_x86_32_program(X86_32_CHECKS))
    _gcc(["-m32", "-ffreestanding", "-S", "-o", "x86_32.s", "x86_32.c"], workdir)
    assembly = (workdir / "x86_32.s").read_text()
    body = assembly.split("xenabi_values:", 1)[1]
    x86_32 = [int(match) - 1 for match in re.findall(r"^\s*\.long\s+(\d+)\s*$", body, re.MULTILINE)]
    return HeaderResults(native, products, x86_32[:len(X86_32_CHECKS)])


NATIVE_CHECKS = _native_checks()
X86_32_CHECKS = _x86_32_checks()


def _groups(checks: list[Check]) -> list[str]:
    return list(dict.fromkeys(check.group for check in checks))


def _compare(group: str, checks: list[Check], actual: Any) -> None:
    drift = []
    for index, check in enumerate(checks):
        if check.group != group:
            continue
        signed, unsigned = actual(index)
        got = signed if check.expected < 0 else unsigned
        if got != check.expected:
            drift.append(f"{check.name}: python {check.expected:#x} ({check.expected}), headers {got:#x} ({got})"
                         f"  [{check.c_expr}]")
    if drift:
        pytest.fail(f"{group} drifted from the Xen headers:\n" + "\n".join(drift), pytrace=False)


@pytest.mark.parametrize("group", _groups(NATIVE_CHECKS))
def test_native_abi(group: str, header_results: HeaderResults) -> None:
    _compare(group, NATIVE_CHECKS, lambda index: header_results.native[index])


@pytest.mark.parametrize("group", _groups(X86_32_CHECKS))
def test_x86_32_abi(group: str, header_results: HeaderResults) -> None:
    assert len(header_results.x86_32) == len(X86_32_CHECKS), "could not read the i386 values back from gcc -S"
    _compare(group, X86_32_CHECKS, lambda index: (header_results.x86_32[index],) * 2)


def test_pvdrivers_products(header_results: HeaderResults) -> None:
    ours = {name: int(product) for product, name in unplug.PVDRIVERS_PRODUCT_NAMES.items()}
    assert ours == header_results.products
    assert set(unplug.PVDRIVERS_PRODUCT_NAMES) == set(unplug.PvdriversProduct)


def test_xs_wire_is_checked() -> None:
    """The xs_wire layouts are part of the native groups above."""
    assert any(check.group.startswith("xs_wire") for check in NATIVE_CHECKS)
