"""A machine made a Xen domain: xenhv knows it (RAM file, device-model QMP socket) and the vCPU has
its trap link. This is the guest's view before the driver stack exists; the agent builds on it."""
from __future__ import annotations

from dataclasses import dataclass

from harness.machine import Machine
from harness.services import HostServices
from stack.vcpu.cpu import Vcpu
from stack.vcpu.hypervisor import HypervisorLink


@dataclass
class XenDomain:
    domid: int
    machine: Machine
    host: HostServices
    vcpu: Vcpu
    link: HypervisorLink

    @classmethod
    def create(cls, host: HostServices, machine: Machine) -> "XenDomain":
        domid = host.allocate_domid()
        ctl = host.xenhv_control()
        try:
            info = ctl.call("create_domain", domid=domid, name=machine.name, ram_path=str(machine.paths.ram),
                            ram_size=machine.guest.memory_mib << 20, dm_qmp=str(machine.paths.dm_qmp_socket))
        finally:
            ctl.close()
        try:
            link = HypervisorLink(info["trap_socket"], domid)
        except BaseException:
            cls._destroy(host, domid)
            raise
        return cls(domid, machine, host, Vcpu(machine.qtest, machine.memory, link), link)

    def control(self, op: str, **args: object) -> object:
        ctl = self.host.xenhv_control()
        try:
            return ctl.call(op, domid=self.domid, **args)
        finally:
            ctl.close()

    @staticmethod
    def _destroy(host: HostServices, domid: int) -> None:
        ctl = host.xenhv_control()
        try:
            ctl.call("destroy_domain", domid=domid)
        finally:
            ctl.close()

    def destroy(self) -> None:
        self.link.close()
        self._destroy(self.host, self.domid)
