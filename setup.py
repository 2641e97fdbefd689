"""Builds protocol._seqlock, the C helper that gives the ring its memory ordering.

Everything else is declared in pyproject.toml.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "protocol._seqlock",
            sources=["protocol/_seqlock.c"],
            extra_compile_args=["-O2", "-std=c11"],
        )
    ]
)
