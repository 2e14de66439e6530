"""Mamba-2 SSD on a GPU: ours (fused Triton) against the official `mamba_chunk_scan_combined`
(Triton, run from the mamba-ssm source package), flash-linear-attention's `chunk_simple_gla` (the
same computation as gated linear attention, forward only) and causal SDPA, side by side.

Shapes follow shared/ANCHORS.md: batch 8, 24 heads x 64, N 128, ngroups 1, chunk 256, bf16
x/dt/B/C, fp32 A/D/dt_bias, D, dt_bias, dt_softplus. Attention: 12 heads x 64 (d_model 768).
"""
from __future__ import annotations

import functools
import glob
import importlib
import os
import sys
import tarfile
import types

import torch
import torch.nn.functional as F

from mambakit.bench.common import errors_against, fwd_and_fwdbwd_ms

HEADS, HEAD_DIM, STATE, GROUPS, CHUNK = 24, 64, 128, 1, 256
ATTN_HEADS = 12


@functools.cache
def official_ssd():
    """The official `mamba_chunk_scan_combined`, imported from the mamba-ssm source package in
    .pkgs/ without its package __init__ (which needs the compiled CUDA extensions); None if absent."""
    try:
        import mamba_ssm.ops.triton.ssd_combined as mod  # an installed package
        return mod.mamba_chunk_scan_combined
    except Exception:
        pass
    found = sorted(glob.glob(os.path.join(os.environ.get("MAMBAKIT_PKGS", ".pkgs"), "mamba_ssm-*.tar.gz")))
    if not found:
        print("official mamba_ssm unavailable: no .pkgs/mamba_ssm-*.tar.gz", file=sys.stderr)
        return None
    target = "/tmp/mambakit_official"
    with tarfile.open(found[-1]) as tar:
        tar.extractall(target, filter="data")
    root = glob.glob(os.path.join(target, "mamba_ssm-*", "mamba_ssm"))[0]
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]
    stub = types.ModuleType("mamba_ssm")  # a bare package: its submodules import, its __init__ does not run
    stub.__path__ = [root]
    sys.modules["mamba_ssm"] = stub
    return importlib.import_module("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined


@functools.cache
def fla_simple_gla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:
        print(f"flash-linear-attention unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return chunk_simple_gla


def ssd_inputs(batch: int, length: int, device="cuda", heads=HEADS) -> dict:
    """Random inputs of the benchmark shape, leaves requiring grad."""
    bf16 = dict(device=device, dtype=torch.bfloat16)
    inputs = dict(
        x=torch.randn(batch, length, heads, HEAD_DIM, **bf16),
        dt=torch.randn(batch, length, heads, **bf16),
        A=-(torch.rand(heads, device=device) * 15 + 1),
        B=torch.randn(batch, length, GROUPS, STATE, **bf16),
        C=torch.randn(batch, length, GROUPS, STATE, **bf16),
        D=torch.randn(heads, device=device),
        dt_bias=torch.rand(heads, device=device) * 4 - 6,  # softplus(dt + bias) mostly in (1e-3, 0.1)
    )
    return {k: v.requires_grad_() for k, v in inputs.items()}


def ssd_bytes(batch: int, length: int) -> int:
    """Bytes a forward must move: x, dt, B, C read and out written, bf16."""
    return batch * length * (2 * HEADS * HEAD_DIM + HEADS + 2 * GROUPS * STATE) * 2


def ssd_fn(impl: str):
    """Function (inputs -> out) for an implementation name."""
    if impl == "official":
        fn = official_ssd()
        return None if fn is None else (lambda i: fn(**i, chunk_size=CHUNK, dt_softplus=True))
    from mambakit.ops.ssd import ssd

    return lambda i: ssd(**i, chunk_size=CHUNK, dt_softplus=True, backend="triton")


def gla_inputs(inputs: dict) -> dict:
    """The SSD as gated linear attention: q = C, k = B expanded to every head, v = x * dt, g = A * dt.
    Made outside the timed region."""
    with torch.no_grad():
        dt = F.softplus(inputs["dt"].float() + inputs["dt_bias"])
        heads = inputs["x"].shape[2]
        return dict(q=inputs["C"].expand(-1, -1, heads, -1).contiguous(), k=inputs["B"].expand(-1, -1, heads, -1).contiguous(),
                    v=(inputs["x"] * dt[..., None]).to(torch.bfloat16), g=(dt * inputs["A"]).contiguous())


def errors_vs_official(inputs: dict) -> dict:
    """Relative error of our output and of every gradient against the official kernel (bf16 both)."""
    return errors_against(ssd_fn("mambakit"), ssd_fn("official"), inputs)


def run(lengths: list[int], args) -> list[dict]:
    """Rows {"op": "ssd", "impl", "L", "batch", "fwd_ms", "fwdbwd_ms", "fwd_gbs"} for every length."""
    batch = getattr(args, "batch", 8)
    rows = []
    for L in lengths:
        inputs = ssd_inputs(batch, L)
        if official_ssd() is not None:
            errs = errors_vs_official(inputs)
            print(f"ssd L={L}: relative error vs official: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        for impl in ("mambakit", "official"):
            fn = ssd_fn(impl)
            if fn is None:
                continue
            fwd, fwdbwd = fwd_and_fwdbwd_ms(fn, inputs, backward=True)
            rows.append(dict(op="ssd", impl=impl, L=L, batch=batch, fwd_ms=fwd, fwdbwd_ms=fwdbwd,
                             fwd_gbs=ssd_bytes(batch, L) / fwd / 1e6))
        gla = fla_simple_gla()
        if gla is not None:  # its backward refuses Triton 3.6 on Hopper (fla issue #640): forward only
            g_in = gla_inputs(inputs)
            fwd, _ = fwd_and_fwdbwd_ms(lambda i: gla(**i, scale=1.0)[0], g_in, backward=False)
            rows.append(dict(op="ssd", impl="fla", L=L, batch=batch, fwd_ms=fwd, fwdbwd_ms=None,
                             fwd_gbs=ssd_bytes(batch, L) / fwd / 1e6))
        del inputs
        q, k, v = (torch.randn(batch, ATTN_HEADS, L, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        fwd, fwdbwd = fwd_and_fwdbwd_ms(lambda i: F.scaled_dot_product_attention(**i, is_causal=True),
                            dict(query=q, key=k, value=v), backward=True)
        rows.append(dict(op="ssd", impl="sdpa", L=L, batch=batch, fwd_ms=fwd, fwdbwd_ms=fwdbwd))
        torch.cuda.empty_cache()
    return rows
