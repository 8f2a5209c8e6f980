"""The C part of snapvol; everything else is declared in pyproject.toml.

`snapvol.layout._blocksum` hashes runs of blocks with the system's xxhash header (Debian:
libxxhash-dev, which scripts/install-system.sh installs), compiled in.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("snapvol.layout._blocksum", ["src/snapvol/layout/_blocksum.c"],
                             extra_compile_args=["-O3"])])
