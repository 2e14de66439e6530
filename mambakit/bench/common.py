"""Timing and result files shared by every benchmark."""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mambakit._io import write_json

VERSIONED_PACKAGES = ("torch", "triton", "mambakit", "mamba-ssm", "causal-conv1d", "flash-linear-attention", "transformers")


def time_ms(fn: Callable[[], object], warmup_ms: int = 50, rep_ms: int = 200) -> float:
    """Median milliseconds of `fn()` on the GPU (CUDA events via triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def gpu_kernel_times(run: Callable[[], object], repeats: int) -> tuple[list[dict], float, float]:
    """`run()` `repeats` times under the torch profiler: (kernels by GPU time, each {"name", "calls", "us"}
    per run; GPU us per run; launches per run)."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    calls, us = defaultdict(int), defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            calls[event.name] += 1
            us[event.name] += event.device_time
    kernels = sorted(({"name": n[:90], "calls": calls[n] / repeats, "us": us[n] / repeats} for n in calls),
                     key=lambda k: -k["us"])
    return kernels, sum(us.values()) / repeats, sum(calls.values()) / repeats


class LargestTensor(TorchDispatchMode):
    """While active, records the largest tensor any op produces: `largest_numel` elements, `largest_bytes`."""

    def __init__(self):
        super().__init__()
        self.largest_numel = self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest_numel = max(self.largest_numel, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
        return out


def fwdbwd_step(fn: Callable[[dict], torch.Tensor], inputs: dict) -> Callable[[], object]:
    """One forward+backward of `fn(inputs)` as a callable: gradients w.r.t. the inputs that require
    them, against a fixed random output gradient."""
    leaves = [v for v in inputs.values() if v.requires_grad]
    grad = torch.randn_like(fn(inputs))
    return lambda: torch.autograd.grad(fn(inputs), leaves, grad)


def fwd_and_fwdbwd_ms(fn: Callable[[dict], torch.Tensor], inputs: dict,
                      backward: bool = True) -> tuple[float, float | None]:
    """Median forward and forward+backward (`fwdbwd_step`) milliseconds of `fn(inputs)`."""
    with torch.no_grad():
        fwd = time_ms(lambda: fn(inputs))
    if not backward:
        return fwd, None
    return fwd, time_ms(fwdbwd_step(fn, inputs))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def errors_against(fn: Callable[[dict], torch.Tensor], ref_fn: Callable[[dict], torch.Tensor], inputs: dict) -> dict:
    """Relative error of fn's output ("out") and of its gradient for every input, against ref_fn's."""
    leaves = {name: v for name, v in inputs.items() if v.requires_grad}
    out, ref = fn(inputs), ref_fn(inputs)
    grad = torch.randn_like(out)
    errs = {"out": rel_err(out, ref)}
    grads = zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad),
                torch.autograd.grad(ref, list(leaves.values()), grad))
    errs.update({name: rel_err(a, b) for name, a, b in grads})
    return errs


def environment() -> dict:
    """Device name and the versions of every package a comparison depends on."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "cuda": torch.version.cuda, "python": platform.python_version(), "versions": versions}


def device_slug() -> str:
    """Short file-name form of the device, e.g. 'h100' for 'NVIDIA H100 80GB HBM3'."""
    name = environment()["device"].lower()
    for tag in ("h200", "h100", "a100", "l40s", "a10g", "rtx"):
        if tag in name:
            return tag
    return "cpu" if not torch.cuda.is_available() else name.split()[-1]


MEASURED_SUFFIXES = ("_ms", "_us", "_gbs", "_gb", "tok_s", "_err")


def row_key(row: dict) -> tuple:
    """Rows are the same measurement when everything but the measured figures agrees."""
    return tuple(sorted((k, str(v)) for k, v in row.items() if not k.endswith(MEASURED_SUFFIXES)))


def save_rows(path: str | Path, rows: Iterable[dict]) -> dict:
    """Merge `rows` into the JSON results file at `path` (newer rows replace same-key ones), atomically."""
    path = Path(path)
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    merged = {row_key(r): r for r in old["rows"]}
    merged.update({row_key(r): r for r in rows})
    doc = {"environment": environment(), "rows": list(merged.values())}
    write_json(path, doc)
    return doc


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Fixed-width text table of `rows` restricted to `columns` (missing cells shown as '-')."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))

    table = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in table)
