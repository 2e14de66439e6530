"""Helpers for the layer tests: relative error and a minimal inference-cache holder (see DESIGN.md)."""
from dataclasses import dataclass, field

import pytest
import torch


@dataclass
class CacheParams:
    """The duck-typed `inference_params` of the inference-cache protocol, nothing more."""
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    lengths_per_sample: torch.Tensor | None = None
    key_value_memory_dict: dict = field(default_factory=dict)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture
def rel():
    return relative_error


@pytest.fixture
def cache_params():
    return CacheParams
