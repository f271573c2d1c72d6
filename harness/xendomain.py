"""A machine made a Xen domain by the toolstack: xenhv knows it (RAM file, device-model QMP socket),
xenstore holds its tree and has its store ring, and the vCPU has its trap link. This is the guest's
view before the driver stack exists; the agent builds on it."""
from __future__ import annotations

from dataclasses import dataclass

from xenpv.backends.toolstack import CreatedDomain, Toolstack
from xenpv.harness.machine import Machine
from xenpv.backends.host import HostServices
from xenpv.stack.vcpu.cpu import Vcpu
from xenpv.stack.vcpu.hypervisor import HypervisorLink


@dataclass
class XenDomain:
    created: CreatedDomain
    machine: Machine
    host: HostServices
    toolstack: Toolstack
    vcpu: Vcpu
    link: HypervisorLink

    @property
    def domid(self) -> int:
        return self.created.domid

    @classmethod
    def create(cls, host: HostServices, machine: Machine) -> "XenDomain":
        toolstack = Toolstack(host)
        try:
            created = toolstack.create(machine)
            try:
                link = HypervisorLink(host.run_dir / f"hv-{created.domid}.sock", created.domid)
            except BaseException:
                toolstack.destroy(created.domid)
                raise
        except BaseException:
            toolstack.close()
            raise
        return cls(created, machine, host, toolstack, Vcpu(machine.qtest, machine.memory, link), link)

    def control(self, op: str, **args: object) -> object:
        """A xenhv control operation on this domain."""
        return self.toolstack.ctl.call(op, domid=self.domid, **args)

    def destroy(self) -> None:
        self.link.close()
        try:
            self.toolstack.destroy(self.domid)
        finally:
            self.toolstack.close()
