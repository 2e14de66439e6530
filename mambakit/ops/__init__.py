"""Pure tensor operations: selective scan (Mamba-1), SSD (Mamba-2), causal conv1d, RMS norms (and, for
decode steps, a norm fused into the linear layer after it) and the LM head's fused linear + cross-entropy.

Each op validates its arguments, then dispatches to a path (`backend="reference" | "cpu" | "triton"`). The
single-token steps also have an `*_unchecked` entry (dispatch only) for the layers' decode steps, whose
arguments are right by construction: the checks would run per token and layer.
"""
from mambakit.ops.conv1d import causal_conv1d, causal_conv1d_fn, causal_conv1d_update  # noqa: F401
from mambakit.ops.linear_cross_entropy import linear_cross_entropy  # noqa: F401
from mambakit.ops.norm import RMSNorm, RMSNormGated, rms_norm, rms_norm_gated  # noqa: F401
from mambakit.ops.norm_linear import rms_norm_gated_linear, rms_norm_linear  # noqa: F401
from mambakit.ops.selective_scan import selective_scan, selective_scan_fn, selective_state_update  # noqa: F401
from mambakit.ops.ssd import mamba_chunk_scan_combined, ssd, ssd_state_update  # noqa: F401
