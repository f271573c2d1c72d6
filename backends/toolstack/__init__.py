"""The toolstack: makes a launched machine a Xen domain (xenhv, xenstore, devices) and tears it down."""
from xenpv.backends.toolstack.domain import CreatedDomain, Toolstack, ToolstackError, create_domain, destroy_domain

__all__ = ["CreatedDomain", "Toolstack", "ToolstackError", "create_domain", "destroy_domain"]
