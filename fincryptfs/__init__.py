"""Fincrypt client: an encrypted, erasure-coded FUSE filesystem backed by paid storage nodes."""

__version__ = "0.1.0"
