# setuptools reads everything from pyproject.toml; this file exists only
# because cffi's API-mode build hook ("cffi_modules") has no pyproject key.
from setuptools import setup

setup(cffi_modules=["vfiouserd/_native_build.py:ffibuilder"])
