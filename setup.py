"""The one compiled part: cogalora/int8_rows.c, optional (everything else is in pyproject.toml).

Without a C compiler the build skips it and the int8 path runs on torch operations instead, with the
same results (cogalora/int8_kernels.py).
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "cogalora/int8_rows.c"
# The library reports the digest of the source it was built from: cogalora/int8_kernels.py refuses one
# built from another version (an editable install whose sources moved on without a rebuild).
DIGEST = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()[:16]

setup(
    ext_modules=[
        Extension(
            "cogalora._int8_rows",
            sources=[SOURCE],
            define_macros=[("COGALORA_SOURCE_DIGEST", f'"{DIGEST}"')],
            # No contraction into fused multiply-adds, no reassociation: the bits of the torch path.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        )
    ]
)
