"""The one C extension; every other piece of packaging metadata is in setup.cfg.

``fincryptfs.core._leafhash`` hashes Merkle leaves without holding the GIL (docs/design.md, "Leaf hashing").
It is optional: without a compiler or the OpenSSL headers the install goes on and ``fincryptfs.core.merkle``
computes the same hashes with hashlib, only slower on two cores.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("fincryptfs.core._leafhash", ["fincryptfs/core/_leafhash.c"], libraries=["crypto"],
                             optional=True)])
