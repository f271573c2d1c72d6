"""netback: the dom0 network back-end (netif tx/rx rings with rx-copy) attached to TAP devices inside a
network namespace the harness creates, so the guest's peer on the wire is that namespace's Linux kernel."""
