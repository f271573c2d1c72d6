"""A wire-compatible xenstore daemon: dom0 clients on a unix socket, guests on their ring page."""
