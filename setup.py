"""Build script. Metadata lives in pyproject.toml; the C extension (cext/) will hang off here."""

from setuptools import setup

setup()
