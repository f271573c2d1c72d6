"""`iface grant DOMID PAGES REQUESTID...`: a user-mode program over XENIFACE's grant IOCTLs.

One process opens the XENIFACE device (GUID_INTERFACE_XENIFACE), asks for a grant of PAGES driver pages to
DOMID once per REQUESTID (the legacy IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS, which names a request by
its RequestId), prints each answer, and ends: its end cancels every grant still pending (XENIFACE revokes
them), so nothing outlives the command. A RequestId given twice is a second request with an id the
process already uses, which XENIFACE refuses (STATUS_INVALID_PARAMETER): the failure path of
GnttabPermitForeignAccess, where bug switch xeniface-1019522 lives.
"""
from __future__ import annotations

from xenpv.stack.agent.console import UsageError, command, parse_int
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.drivers.xeniface import abi
from xenpv.stack.kernel import status_name
from xenpv.stack.kernel.io import IoError, SetupDiGetClassDevs, UserProcess
from xenpv.stack.kernel.status import STATUS_PENDING

MAX_REQUESTS = 16
MAX_PAGES = 64  # a console tool's bound; XENIFACE takes up to 1M


@command("iface", "grants through XENIFACE from a user-mode process, which then ends",
         ("grant DOMID PAGES REQUESTID [REQUESTID...]",),
         details="one IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS per REQUESTID (a repeated one is refused: "
                 f"the id is in use); PAGES 1..{MAX_PAGES}, at most {MAX_REQUESTS} requests; the process's end "
                 "revokes every grant")
def _iface(rt: GuestRuntime, args: list[str]) -> str:
    domain = parse_int(args[1], "DOMID", 0, 0x7FEF)
    pages = parse_int(args[2], "PAGES", 1, MAX_PAGES)
    ids = [parse_int(a, "REQUESTID", 0, 0xFFFFFFFF) for a in args[3:]]
    if len(ids) > MAX_REQUESTS:
        raise UsageError(f"at most {MAX_REQUESTS} REQUESTIDs")
    with rt.kernel.cpu.lock:
        links = SetupDiGetClassDevs(rt.kernel.pnp, abi.GUID_INTERFACE_XENIFACE)
        if not links:
            return "no XENIFACE device interface: XENIFACE is not running"
        process = UserProcess(rt.kernel.pnp, "iface")
        try:
            device = process.CreateFile(links[0])
        except IoError as exc:
            return str(exc)
        lines: list[str] = []
        try:
            out_len = abi.field_offset(abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_OUT, "References", pages)
            for request_id in ids:
                request = abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN(RequestId=request_id, RemoteDomain=domain,
                                                                      NumberPages=pages).pack()
                result = process.DeviceIoControl(device, abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS, request,
                                                  out_len)
                if result.status != STATUS_PENDING:
                    lines.append(f"request {request_id}: {status_name(result.status)}")
                    continue
                refs = [int.from_bytes(result.output[8 + 4 * i:12 + 4 * i], "little") for i in range(pages)]
                lines.append(f"request {request_id}: granted refs {','.join(map(str, refs))}")
            pending = len(process.pending)
        except BaseException:
            if rt.kernel.cpu.halted is None:  # after a STOP (or the harness gave up) no driver code runs
                process.exit()
            raise
        process.exit()
        lines.append(f"process ended: {pending} grant(s) revoked")
        return "\n".join(lines)
