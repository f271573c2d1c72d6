"""blkback: the dom0 block back-end (blkif over grant-mapped rings, raw images directly, qcow2 through an
NBD export by qemu-nbd).  Run as ``python -m xenpv.backends.blkback``."""
