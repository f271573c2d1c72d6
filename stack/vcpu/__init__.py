"""The vCPU layer: the agent drives QEMU as its CPU (qtest), sees guest RAM through the RAM file, and walks PCI."""
