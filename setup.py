"""Builds the optional C extension (c_ext/) when a C compiler is present; everything else is in setup.cfg.

Without a compiler the build of the extension fails, setuptools says so, and mpimap installs in pure
Python (``optional=True``): ``mpimap info`` tells which is in use.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("mpimap._native", sources=["c_ext/_native.c", "c_ext/heartbeat.c"],
                             include_dirs=["c_ext"], extra_compile_args=["-O2"], optional=True)])
