"""Helpers for the layer tests: relative error and a minimal inference-cache holder (see DESIGN.md)."""
from dataclasses import dataclass, field

import pytest
import torch

from mambakit.bench.common import rel_err


@dataclass
class CacheParams:
    """The duck-typed `inference_params` of the inference-cache protocol, nothing more."""
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    lengths_per_sample: torch.Tensor | None = None
    key_value_memory_dict: dict = field(default_factory=dict)


@pytest.fixture
def rel():
    return rel_err


@pytest.fixture
def cache_params():
    return CacheParams
