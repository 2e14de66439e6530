"""mambakit: Mamba (selective scan) and Mamba-2 (SSD) layers and language models, API-compatible with `mamba_ssm`.

Importing it needs only PyTorch: Triton kernels load on first use on a GPU, `transformers` never.
"""
from mambakit.layers import MHA, Block, GatedMLP, Mamba, Mamba2
from mambakit.models import MambaConfig, MambaLMHeadModel
from mambakit.ops import (
    RMSNorm,
    RMSNormGated,
    causal_conv1d,
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    rms_norm,
    rms_norm_gated,
    selective_scan,
    selective_scan_fn,
    selective_state_update,
    ssd,
    ssd_state_update,
)
from mambakit.prepacking import prepack
from mambakit.quantization import quantize

__version__ = "0.1.0"

__all__ = [
    "Block", "GatedMLP", "MHA", "Mamba", "Mamba2", "MambaConfig", "MambaLMHeadModel",
    "RMSNorm", "RMSNormGated", "causal_conv1d", "causal_conv1d_fn", "causal_conv1d_update",
    "mamba_chunk_scan_combined", "prepack", "quantize", "rms_norm", "rms_norm_gated", "selective_scan", "selective_scan_fn",
    "selective_state_update", "ssd", "ssd_state_update",
]
