"""The hypervisor model: domains, the p2m, event channels, grant tables, HVM params, the platform unplug
ports, and the vhost-user front-end to every dom0 back-end. One process per host (`python -m xenpv.backends.xenhv`)."""
