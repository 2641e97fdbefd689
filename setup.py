"""Builds the C helpers: protocol._seqlock (the ring's memory ordering) and producer._lzf
(LZF decompression for PCD binary_compressed point clouds; sequential by nature).

Everything else is declared in pyproject.toml.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "protocol._seqlock",
            sources=["protocol/_seqlock.c"],
            extra_compile_args=["-O2", "-std=c11"],
        ),
        Extension(
            "producer._lzf",
            sources=["producer/_lzf.c"],
            extra_compile_args=["-O2", "-std=c11"],
        ),
    ]
)
