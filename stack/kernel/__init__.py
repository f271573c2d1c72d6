"""The Windows kernel semantics the PV drivers depend on (see the modules; exports follow)."""
