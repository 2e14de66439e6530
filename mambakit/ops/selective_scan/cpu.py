"""Selective scan for the CPU: the recurrence as a time-major loop over (batch, dim, N) slices that stay
in cache, with a hand-written backward.

The reference builds (batch, dim, L, N) intermediates and lets autograd record every step; here the only
full-size tensor is the states saved for the backward, and each step's reductions happen while its slice
is in cache. Without gradients nothing of size L x N is built at all (`recurrence_without_grad`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from mambakit.ops._common import custom_op_if_compiling, eager_autograd
from mambakit.ops.selective_scan.reference import compute_dtype, discretize_delta, skip_and_gate


def by_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., dim, N) -> (..., groups, dim // groups, N): a view, channel c in group c // (dim // groups)."""
    return t.unflatten(-2, (groups, -1))


def all_decays(delta, A, keep):
    """exp(delta_t * A) for every step (L, batch, dim, N), zero where a new sequence starts (keep == 0)."""
    decay = (delta.unsqueeze(-1) * A).exp_()  # in place: a fresh full-size buffer costs more than the exp
    return decay if keep is None else decay.mul_(keep[:, :, None, None])


def as_columns(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(L, batch, dim) -> (L, batch, groups, dim // groups, 1)."""
    return x.unflatten(2, (groups, -1)).unsqueeze(-1)


def recurrence_without_grad(delta, delta_u, A, B, C, h0, keep):
    """`recurrence_forward` when no gradient is needed (prefill, evaluation): one state and two scratch
    buffers of (batch, N, dim), reused every step, so memory is O(batch * dim * N) at any length and every
    step works in cache. N before dim makes the reduction over N an add across contiguous channels."""
    groups_b, groups_c = B.shape[2], C.shape[2]
    h = h0.transpose(1, 2).contiguous()
    decay, product = torch.empty_like(h), torch.empty_like(h)
    h_b, h_c = h.unflatten(2, (groups_b, -1)), h.unflatten(2, (groups_c, -1))  # (batch, N, G, dim // G)
    product_c = product.unflatten(2, (groups_c, -1))
    A_rows = A.t().contiguous()  # (N, dim)
    delta_rows = delta.unsqueeze(2)  # (L, batch, 1, dim)
    u_rows = delta_u.unflatten(2, (groups_b, -1)).unsqueeze(2)  # (L, batch, 1, G, dim // G)
    B_cols, C_cols = B.transpose(2, 3).unsqueeze(-1), C.transpose(2, 3).unsqueeze(-1)  # (L, batch, N, G, 1)
    y = delta.new_empty(delta.shape)
    for t in range(delta.shape[0]):
        torch.mul(delta_rows[t], A_rows, out=decay)
        decay.exp_()
        if keep is not None:
            decay.mul_(keep[t][:, None, None])
        h.mul_(decay)
        h_b.addcmul_(u_rows[t], B_cols[t])
        torch.mul(h_c, C_cols[t], out=product_c)
        torch.sum(product, dim=1, out=y[t])
    return y, h.transpose(1, 2).contiguous()


def recurrence_forward(delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor,
                       keep: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """h_t = decay_t * h_{t-1} + delta_u_t * B_t,  y_t = C_t . h_t,  decay_t = exp(delta_t * A) * keep_t.

    Time-major: delta, delta_u (L, batch, dim); A (dim, N); B, C (L, batch, G, N); h0 (batch, dim, N);
    keep (L, batch) or None. Returns y (L, batch, dim), the last state (batch, dim, N) and every state
    (L, batch, dim, N), which the backward reads. Views are built once, outside the loops; each step
    reduces over N or over a group's channels with multiply-and-sum (faster than matmul at these sizes)
    while its slice is still in cache.
    """
    groups_b, groups_c = B.shape[2], C.shape[2]
    states = all_decays(delta, A, keep)  # overwritten step by step with h_t = decay_t * h_{t-1} + ...
    y = delta.new_empty(delta.shape)
    states_b, states_c = by_group(states, groups_b), by_group(states, groups_c)
    u_cols, B_rows, C_rows = as_columns(delta_u, groups_b), B.unsqueeze(3), C.unsqueeze(3)
    y_groups = y.unflatten(2, (groups_c, -1))
    h = h0
    for t in range(delta.shape[0]):
        states[t].mul_(h)
        states_b[t].addcmul_(u_cols[t], B_rows[t])
        torch.sum(states_c[t] * C_rows[t], dim=-1, out=y_groups[t])
        h = states[t]
    return y, h.clone(), states


def recurrence_backward(grad_y: Tensor, grad_last: Tensor, delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor,
                        C: Tensor, h0: Tensor, keep: Optional[Tensor],
                        states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `recurrence_forward`'s (y, last state) for (delta, delta_u, A, B, C, h0), shapes as there."""
    groups_b, groups_c = B.shape[2], C.shape[2]
    grad_delta, grad_delta_u = torch.empty_like(delta), torch.empty_like(delta_u)
    grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
    grad_A = torch.zeros_like(h0)  # per batch row, summed at the end
    decays = all_decays(delta, A, keep)
    states_c = by_group(states, groups_c)
    grad_y_cols, u_cols = as_columns(grad_y, groups_c), as_columns(delta_u, groups_b)
    B_rows, C_rows = B.unsqueeze(3), C.unsqueeze(3)
    grad_delta_u_groups = grad_delta_u.unflatten(2, (groups_b, -1))
    g = grad_last  # dL/dh_t, through every later step
    for t in reversed(range(delta.shape[0])):
        torch.sum(grad_y_cols[t] * states_c[t], dim=2, out=grad_C[t])
        g = torch.addcmul(by_group(g, groups_c), grad_y_cols[t], C_rows[t]).flatten(1, 2)
        g_b = by_group(g, groups_b)
        torch.sum(g_b * B_rows[t], dim=-1, out=grad_delta_u_groups[t])
        torch.sum(g_b * u_cols[t], dim=2, out=grad_B[t])
        g.mul_(decays[t])
        grad_log_decay = g * (states[t - 1] if t > 0 else h0)  # dL/d(delta_t * A)
        torch.sum(grad_log_decay * A, dim=-1, out=grad_delta[t])
        grad_A.addcmul_(grad_log_decay, delta[t].unsqueeze(-1))
    return grad_delta, grad_delta_u, grad_A.sum(0), grad_B, grad_C, g


# Custom ops (forward, backward, autograd link): torch.compile sees one opaque node instead of unrolling
# the loop over time; eager calls take the same bodies through an autograd.Function.
def _recurrence_fwd(delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor,
                    keep: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    # Contiguous inputs (no copy for those `selective_scan` passes): outputs laid out as the fake says.
    return recurrence_forward(delta.contiguous(), delta_u.contiguous(), A, B.contiguous(), C.contiguous(), h0, keep)


_recurrence_fwd_op = torch.library.custom_op("mambakit::selective_scan_cpu_fwd", _recurrence_fwd, mutates_args=())


@_recurrence_fwd_op.register_fake
def _(delta, delta_u, A, B, C, h0, keep):
    return delta.new_empty(delta.shape), h0.new_empty(h0.shape), delta.new_empty(*delta.shape, A.shape[1])


def _recurrence_bwd(grad_y: Tensor, grad_last: Tensor, delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor,
                    C: Tensor, h0: Tensor, keep: Optional[Tensor],
                    states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # Contiguous inputs (a compiled graph may hand over gradients with other strides): outputs as the fake says.
    return recurrence_backward(grad_y.contiguous(), grad_last.contiguous(), delta.contiguous(), delta_u.contiguous(),
                               A, B.contiguous(), C.contiguous(), h0, keep, states)


_recurrence_bwd_op = torch.library.custom_op("mambakit::selective_scan_cpu_bwd", _recurrence_bwd, mutates_args=())


@_recurrence_bwd_op.register_fake
def _(grad_y, grad_last, delta, delta_u, A, B, C, h0, keep, states):
    return (delta.new_empty(delta.shape), delta_u.new_empty(delta_u.shape), A.new_empty(A.shape),
            B.new_empty(B.shape), C.new_empty(C.shape), h0.new_empty(h0.shape))


def _recurrence_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output[2])


def _recurrence_grads(ctx, grad_y, grad_last, _grad_states, backward=_recurrence_bwd_op):
    delta, delta_u, A, B, C, h0, keep, states = ctx.saved_tensors
    grad_y = grad_y if grad_y is not None else torch.zeros_like(delta)
    grad_last = grad_last if grad_last is not None else torch.zeros_like(h0)
    return (*backward(grad_y, grad_last, delta, delta_u, A, B, C, h0, keep, states), None)


_recurrence_fwd_op.register_autograd(_recurrence_grads, setup_context=_recurrence_setup_context)
_recurrence_eager = eager_autograd(_recurrence_fwd, _recurrence_setup_context,
                                   functools.partial(_recurrence_grads, backward=_recurrence_bwd))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, seq_idx=None):
    """CPU path of `mambakit.ops.selective_scan` (arguments validated there); same results as the reference."""
    dtype = compute_dtype(u)
    batch, dim, _ = u.shape
    # Time-major in memory before the softplus, like the gradient that comes back: softplus_backward on two
    # layouts gets other strides from PyTorch's meta kernel than in eager, which breaks torch.compile.
    delta = discretize_delta(delta.permute(2, 0, 1).contiguous().permute(1, 2, 0), delta_bias, delta_softplus, dtype)
    u32 = u.to(dtype)
    B = B.to(dtype) if B.dim() == 4 else B.to(dtype).unsqueeze(1)
    C = C.to(dtype) if C.dim() == 4 else C.to(dtype).unsqueeze(1)
    h0 = u32.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(dtype)
    keep = None
    if seq_idx is not None:  # 0 where a new sequence starts: the state restarts from zero there
        keep = torch.ones(batch, seq_idx.shape[1], dtype=dtype, device=u.device)
        keep[:, 1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).to(dtype)
        keep = keep.t().contiguous()

    args = (delta.permute(2, 0, 1).contiguous(), (delta * u32).permute(2, 0, 1).contiguous(), A.to(dtype),
            B.permute(3, 0, 1, 2).contiguous(), C.permute(3, 0, 1, 2).contiguous(), h0, keep)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    if needs_grad:
        y, last, _ = custom_op_if_compiling(_recurrence_fwd_op, _recurrence_eager)(*args)
    else:
        y, last = recurrence_without_grad(*args)
    out = skip_and_gate(y.permute(1, 2, 0), u32, D, z).to(u.dtype)
    return (out, last) if return_final_state else out
