"""Fincrypt storage node daemon: stores encrypted shares for clients and is paid for it."""

__version__ = "0.1.0"
