"""Selective scan for the CPU: the recurrence as a time-major loop over (batch, dim, N) slices that stay
in cache, with a hand-written backward.

The reference builds (batch, dim, L, N) intermediates and lets autograd record every step; here the only
full-size tensor is the states saved for the backward, and each step's reductions happen while its slice
is in cache. Without gradients nothing of size L x N is built at all (`recurrence_without_grad`).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

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
    """`Recurrence.forward` when no gradient is needed (prefill, evaluation): one state and two scratch
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


class Recurrence(torch.autograd.Function):
    """h_t = decay_t * h_{t-1} + delta_u_t * B_t,  y_t = C_t . h_t,  decay_t = exp(delta_t * A) * keep_t.

    Time-major: delta, delta_u (L, batch, dim); A (dim, N); B, C (L, batch, G, N); h0 (batch, dim, N);
    keep (L, batch) or None. Returns y (L, batch, dim) and the last state (batch, dim, N).
    Views are built once, outside the loops; each step reduces over N or over a group's channels with
    multiply-and-sum (faster than matmul at these sizes) while its slice is still in cache.
    """

    @staticmethod
    def forward(ctx, delta, delta_u, A, B, C, h0, keep):
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
        ctx.save_for_backward(delta, delta_u, A, B, C, h0, keep, states)
        return y, h.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_last):
        delta, delta_u, A, B, C, h0, keep, states = ctx.saved_tensors
        groups_b, groups_c = B.shape[2], C.shape[2]
        grad_delta, grad_delta_u = torch.empty_like(delta), torch.empty_like(delta_u)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(h0)  # per batch row, summed at the end
        decays = all_decays(delta, A, keep)
        states_c = by_group(states, groups_c)
        grad_y_cols, u_cols = as_columns(grad_y, groups_c), as_columns(delta_u, groups_b)
        B_rows, C_rows = B.unsqueeze(3), C.unsqueeze(3)
        grad_delta_u_groups = grad_delta_u.unflatten(2, (groups_b, -1))
        g = grad_last  # dL/dh_t, through every later step (autograd passes zeros for an unused output)
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
        return grad_delta, grad_delta_u, grad_A.sum(0), grad_B, grad_C, g, None


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, seq_idx=None):
    """CPU path of `mambakit.ops.selective_scan` (arguments validated there); same results as the reference."""
    dtype = compute_dtype(u)
    batch, dim, _ = u.shape
    delta = discretize_delta(delta, delta_bias, delta_softplus, dtype)
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
    y, last = Recurrence.apply(*args) if needs_grad else recurrence_without_grad(*args)
    out = skip_and_gate(y.permute(1, 2, 0), u32, D, z).to(u.dtype)
    return (out, last) if return_final_state else out
