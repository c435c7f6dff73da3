"""The one compiled part: cogalora/int8_rows.c, optional (everything else is in pyproject.toml).

Without a C compiler the build skips it and the int8 path runs on torch operations instead, with the
same results (cogalora/int8_kernels.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "cogalora._int8_rows",
            sources=["cogalora/int8_rows.c"],
            # No contraction into fused multiply-adds, no reassociation: the bits of the torch path.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
            optional=True,
        )
    ]
)
