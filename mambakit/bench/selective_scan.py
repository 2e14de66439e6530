"""Mamba-1 selective scan on a GPU: ours (Triton) against the official `mamba_ssm` CUDA kernel, the
PyTorch reference and causal SDPA, side by side; plus the peak memory of a whole Mamba-1 layer.

Shapes follow shared/ANCHORS.md: batch 8, d_inner 1536, N 16, bf16 u/delta/B/C/z with B and C of
shape (batch, 1, N, L), fp32 A/D/delta_bias, z gate, D, delta_bias, softplus. Attention: 12 heads x 64.
"""
from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from mambakit.bench.common import errors_against, fwd_and_fwdbwd_ms, time_ms

DIM, STATE, HEADS, HEAD_DIM = 1536, 16, 12, 64
REFERENCE_MAX_L = 512  # the reference is a Python loop over time: timed at short lengths only


@functools.cache
def official_scan():
    """The official `selective_scan_fn` (mamba_ssm built with its CUDA extension), or None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # not installed, or installed without its CUDA extension
        print(f"official mamba_ssm selective_scan_fn unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return selective_scan_fn


def scan_inputs(batch: int, length: int, device="cuda") -> dict:
    """Random inputs of the benchmark shape, leaves requiring grad."""
    bf16 = dict(device=device, dtype=torch.bfloat16)
    inputs = dict(
        u=torch.randn(batch, DIM, length, **bf16), delta=torch.randn(batch, DIM, length, **bf16) * 0.5 - 2.0,
        A=-torch.rand(DIM, STATE, device=device) * 15 - 1, B=torch.randn(batch, 1, STATE, length, **bf16),
        C=torch.randn(batch, 1, STATE, length, **bf16), D=torch.randn(DIM, device=device),
        z=torch.randn(batch, DIM, length, **bf16), delta_bias=torch.randn(DIM, device=device) * 0.1,
    )
    return {k: v.requires_grad_() for k, v in inputs.items()}


def scan_bytes(batch: int, length: int) -> int:
    """Bytes a forward must move: u, delta, z read and out written (bf16), B and C read."""
    return 4 * batch * DIM * length * 2 + 2 * batch * STATE * length * 2


def scan_fns(impl: str):
    """Function (inputs -> out) for an implementation name."""
    if impl == "official":
        fn = official_scan()
        return lambda x: fn(**x, delta_softplus=True)
    from mambakit.ops.selective_scan import selective_scan

    backend = "triton" if impl == "mambakit" else "reference"
    return lambda x: selective_scan(**x, delta_softplus=True, backend=backend)


def max_err_vs_official(inputs: dict) -> float:
    """Largest relative error of our output and every gradient against the official kernel."""
    return max(errors_against(scan_fns("mambakit"), scan_fns("official"), inputs).values())


def sdpa_row(batch: int, length: int) -> dict:
    shape = (batch, HEADS, length, HEAD_DIM)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    inputs = dict(q=q, k=k, v=v)
    fn = lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
    fwd, fwdbwd = fwd_and_fwdbwd_ms(fn, inputs)
    moved = 4 * q.numel() * 2
    return {"op": "selective_scan", "impl": "sdpa", "L": length, "batch": batch, "fwd_ms": fwd,
            "fwdbwd_ms": fwdbwd, "fwd_gbs": moved / fwd / 1e6}


def layer_memory_rows(batch: int, length: int) -> list[dict]:
    """Peak memory and time of one Mamba-1 layer (d_model 768) fwd+bwd under bf16 autocast: ours vs official."""
    from mambakit.layers import Mamba

    makers = {"mambakit": lambda: Mamba(768, layer_idx=0)}
    if official_scan() is not None:
        from mamba_ssm.modules.mamba_simple import Mamba as OfficialMamba

        makers["official"] = lambda: OfficialMamba(768, layer_idx=0)
    rows = []
    for impl, make in makers.items():
        layer = make().cuda()
        x = torch.randn(batch, length, 768, device="cuda", requires_grad=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x)
            out.float().square().mean().backward()

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        rows.append({"op": "mamba1_layer", "impl": impl, "L": length, "batch": batch,
                     "fwdbwd_ms": time_ms(step), "peak_gb": peak})
        del layer, x
        torch.cuda.empty_cache()
    return rows


def run(lengths: list[int], args) -> list[dict]:
    """Rows {"op", "impl", "L", "batch", "fwd_ms", "fwdbwd_ms", "fwd_gbs"[, "vs_official_err"]} per length,
    then the Mamba-1 layer rows {"op": "mamba1_layer", "impl", "L", "fwdbwd_ms", "peak_gb"}."""
    batch = getattr(args, "batch", 8)
    impls = ["mambakit"] + (["official"] if official_scan() is not None else []) + ["reference"]
    rows = []
    for length in lengths:
        inputs = scan_inputs(batch, length)
        err = max_err_vs_official(inputs) if "official" in impls else None
        for impl in impls:
            if impl == "reference" and length > REFERENCE_MAX_L:
                continue
            fwd, fwdbwd = fwd_and_fwdbwd_ms(scan_fns(impl), inputs, backward=impl != "reference")
            row = {"op": "selective_scan", "impl": impl, "L": length, "batch": batch, "fwd_ms": fwd,
                   "fwdbwd_ms": fwdbwd, "fwd_gbs": scan_bytes(batch, length) / fwd / 1e6}
            if impl == "mambakit" and err is not None:
                row["vs_official_err"] = err
            rows.append(row)
        del inputs
        rows.append(sdpa_row(batch, length))
        torch.cuda.empty_cache()
    rows += layer_memory_rows(batch, 2048)
    return rows


def build_official(sdist: str, workdir: str = "/tmp/mamba_ssm_src") -> str:
    """Unpack the official sdist and compile only its selective-scan CUDA extension, for this GPU's
    architecture alone (its setup.py builds every architecture). Returns the folder to put on sys.path
    (it holds the `mamba_ssm` package and `selective_scan_cuda*.so`)."""
    import glob
    import os
    import tarfile

    from torch.utils.cpp_extension import load

    with tarfile.open(sdist) as tar:
        tar.extractall(workdir)
    root = glob.glob(os.path.join(workdir, "mamba_ssm-*"))[0]
    csrc = os.path.join(root, "csrc", "selective_scan")
    major, minor = torch.cuda.get_device_capability()
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
             f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]
    flags += [f"-U__CUDA_NO_{t}_{k}__" for t in ("HALF", "BFLOAT16", "BFLOAT162") for k in ("OPERATORS", "CONVERSIONS")]
    sources = [os.path.join(csrc, "selective_scan.cpp")] + sorted(glob.glob(os.path.join(csrc, "*.cu")))
    load("selective_scan_cuda", sources, extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=flags,
         extra_include_paths=[csrc], build_directory=root, verbose=False)
    return root


if __name__ == "__main__":
    print(build_official(sys.argv[1]))
