"""The guest: one process that is the vCPU, runs the kernel model and the PV drivers, and offers a
console (stdin/stdout) that the harness drives with pexpect."""
