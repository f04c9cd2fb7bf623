"""Fincrypt mediator daemon: matches clients with storage nodes, audits nodes and settles payments."""

__version__ = "0.1.0"
