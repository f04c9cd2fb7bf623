"""The C extensions; every other piece of packaging metadata is in setup.cfg.

``fincryptfs.core._leafhash`` hashes Merkle leaves without holding the GIL (docs/design.md, "Leaf hashing").
``fincryptfs.core._gf256`` computes erasure-code parity with AVX2 (docs/design.md, "Erasure coding speed").
Both are optional: without a compiler (or the OpenSSL headers) the install goes on, and
``fincryptfs.core.merkle`` and ``fincryptfs.core.erasure`` compute the same bytes with hashlib and zfec, only
slower.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("fincryptfs.core._leafhash", ["fincryptfs/core/_leafhash.c"], libraries=["crypto"],
                             optional=True),
                   Extension("fincryptfs.core._gf256", ["fincryptfs/core/_gf256.c"], optional=True)])
