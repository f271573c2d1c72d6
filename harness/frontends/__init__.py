"""Test-side Xen frontends: blkfront and netfront running as the guest through its platform services,
without the driver model, for back-end tests and benchmarks."""
