"""The contracts between mmfeed's parts: ring layout, sample schema, control messages, errors.

`protocol` is the only package that both daemons and the CLI import. It has no torch.
"""
from .errors import MmfeedError
from .filters import FilterSpec
from .schema import ModalitySpec, Sample, SampleMeta, SampleSchema

__all__ = ["MmfeedError", "FilterSpec", "ModalitySpec", "Sample", "SampleMeta", "SampleSchema"]
