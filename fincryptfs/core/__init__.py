"""The pure core shared by the client and both daemons.

Everything here is a function over bytes or a frozen dataclass: no sockets, no clock reads except where a
caller passes ``now``, no event loop, no database. The daemons and the FUSE client import from here; nothing
here imports them (``tests/unit/test_core_purity.py`` checks that).
"""
