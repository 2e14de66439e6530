"""Reference Mamba-2 SSD (state space duality) in plain PyTorch: the chunked algorithm of the
Mamba-2 paper (sections 6-7), written for reading, and the definition of truth for faster paths.

Per head the recurrence is h_t = exp(dt_t * A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t,
with h_t of shape (headdim, N). The sequence is cut into chunks of `chunk_size`; inside a chunk the
output is the quadratic (attention-like) form, across chunks the state is passed recurrently.
Decays are computed as exp of segment sums (always <= 0), never as ratios of exponentials.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_DT_LIMIT = (0.0, float("inf"))


def prepare_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=DEFAULT_DT_LIMIT, dtype=torch.float32):
    """dt (..., nheads) -> clamp(softplus(dt + dt_bias)) in `dtype`, as the official Mamba-2 does.

    The clamp only applies when dt_limit differs from the default (0, inf), so that without a
    limit a negative dt (no softplus) passes through unchanged.
    """
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def check_dt_limit(dt_limit):
    """Raise ValueError unless dt_limit is a (low, high) pair with low <= high."""
    try:
        low, high = dt_limit
        ordered = low <= high
    except (TypeError, ValueError):
        ordered = False
    if not ordered:
        raise ValueError(f"dt_limit: expected (low, high) with low <= high, got {dt_limit!r}")


def segment_sum(a):
    """a (..., T) -> (..., T, T) with out[..., i, j] = a[j+1] + ... + a[i] for j <= i, -inf above.

    Summing the segment directly (not cumsum[i] - cumsum[j]) keeps it exact for long chunks.
    """
    T = a.shape[-1]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    terms = a[..., :, None].expand(*a.shape, T).masked_fill(~strictly_lower, 0.0)  # terms[i, j] = a[i] if i > j
    sums = terms.cumsum(dim=-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~causal, float("-inf"))


def _pad_to_chunks(t, length, value=0.0):
    """Pad dim 1 (time) of t to `length`."""
    pad = length - t.shape[1]
    if pad == 0:
        return t
    widths = [0, 0] * (t.dim() - 2) + [0, pad]
    return F.pad(t, widths, value=value)


def _chunk_decays(dA, seq_idx, chunk_size):
    """Decay factors (exp of log-decay sums, all <= 0) within chunks, zero across sequence boundaries.

    dA: (b, c, l, h) the per-step log-decays dt * A; seq_idx: (b, c * l) or None.
    Returns decay (b, h, c, l, l), the factor from step s's input to step t's state,
    decay_from_start (b, h, c, l), the factor from the state entering the chunk to step t, and
    reaches (b or 1, 1, c or 1, l, l) bool, whether step s's input reaches step t's state at all.
    """
    batch, nchunks = dA.shape[:2]
    dA = dA.permute(0, 3, 1, 2)  # (b, h, c, l)
    seg = segment_sum(dA)
    from_start = dA.cumsum(dim=-1)
    reaches = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=dA.device).tril()[None, None, None]
    if seq_idx is not None:
        seq_c = seq_idx.reshape(batch, nchunks, chunk_size)
        same_seq = seq_c[:, :, :, None] == seq_c[:, :, None, :]  # (b, c, l, l)
        reaches = reaches & same_seq[:, None]
        seg = seg.masked_fill(~same_seq[:, None], float("-inf"))
        # The state entering a chunk belongs to the sequence of the step just before the chunk
        # (the initial states belong to the first step's sequence).
        prev_step = torch.cat([seq_idx[:, :1], seq_idx[:, chunk_size - 1:-1:chunk_size]], dim=1)
        continues = seq_c == prev_step[:, :, None]  # (b, c, l)
        from_start = from_start.masked_fill(~continues[:, None], float("-inf"))
    return seg.exp(), from_start.exp(), reaches


def _pass_states(initial_states, carry, chunk_states):
    """Recurrence over chunks: entering[c + 1] = carry[c] * entering[c] + chunk_states[c].

    initial_states: (b, h, p, n); carry: (b, h, c); chunk_states: (b, c, h, p, n).
    Returns the states entering each chunk (b, c, h, p, n) and the final states (b, h, p, n).
    """
    state, entering = initial_states, []
    for c in range(chunk_states.shape[1]):
        entering.append(state)
        state = carry[:, :, c, None, None] * state + chunk_states[:, c]
    return torch.stack(entering, dim=1), state


def ssd(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=DEFAULT_DT_LIMIT, initial_states=None, seq_idx=None, cu_seqlens=None,
        return_final_states=False, return_varlen_states=False):
    """Chunked SSD. Arguments are validated by `mambakit.ops.ssd.ssd`.

    x, z: (batch, L, nheads, headdim); dt: (batch, L, nheads); A: (nheads,);
    B, C: (batch, L, ngroups, N); D: (nheads,) or (nheads, headdim); dt_bias: (nheads,);
    initial_states: (batch, nheads, headdim, N); seq_idx: (batch, L) int (the state resets where it
    changes); cu_seqlens: (num_seqs + 1,) int, batch 1, for the varlen states.
    Returns out (batch, L, nheads, headdim) in x's dtype, then final_states
    (batch, nheads, headdim, N) and varlen_states (num_seqs, nheads, headdim, N) as asked, fp32.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 math, fp64 kept for gradcheck
    dt = prepare_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)

    # A sequence shorter than a chunk is one chunk of its own length (the same sum, without the padding's
    # work). Else pad time to whole chunks: dt = 0 there means decay 1 and no input, states unchanged.
    chunk_size = min(chunk_size, seqlen)
    nchunks = max(1, -(-seqlen // chunk_size))
    padded = nchunks * chunk_size
    if seq_idx is not None:  # padding steps continue the last sequence
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, padded - seqlen)], dim=1)

    def chunked(t):  # (batch, L, ...) -> (batch, nchunks, chunk_size, ...) in fp32
        t = _pad_to_chunks(t.to(dtype), padded)
        return t.reshape(batch, nchunks, chunk_size, *t.shape[2:])

    heads_per_group = nheads // ngroups
    x_c, dt_c = chunked(x), chunked(dt)
    B_c, C_c = chunked(B), chunked(C)  # (b, c, l, g, n): read per group, never copied per head
    x_dt = x_c * dt_c[..., None]  # the input term dt_t x_t of the recurrence

    def by_group(t, dim=1):  # heads (dim) -> (groups, heads of a group), a view
        return t.unflatten(dim, (ngroups, heads_per_group))

    # (1) decays within chunks, zero across sequence boundaries.
    decay, decay_from_start, reaches = _chunk_decays(dt_c * A.to(dtype), seq_idx, chunk_size)

    # (2) intra-chunk outputs: the masked quadratic form (C_t . B_s) * decay(s -> t) * dt_s x_s, C_t . B_s once
    # per group. A later step must not reach an earlier one, NaN and inf included (0 * NaN is NaN): masked
    # weights are filled, not multiplied, non-finite inputs enter as zeros and then make every step they
    # reach NaN, as the recurrence would.
    cb = torch.einsum("bclgn,bcsgn->bgcls", C_c, B_c)
    scores = (by_group(decay) * cb[:, :, None]).flatten(1, 2).masked_fill(~reaches, 0.0)  # (b, h, c, l, s)
    y = torch.einsum("bhcls,bcshp->bclhp", scores, torch.nan_to_num(x_dt, nan=0.0, posinf=0.0, neginf=0.0))
    bad_input = ~torch.isfinite(x_dt.abs().amax(dim=-1))  # (b, c, s, h); amax keeps NaN and inf
    if seq_idx is None:  # reaches is causal: step t sees every step s <= t of its chunk
        poisoned = bad_input.cummax(dim=2).values
    else:
        poisoned = (reaches & bad_input.permute(0, 3, 1, 2)[..., None, :]).any(dim=-1).permute(0, 2, 3, 1)
    y = y.masked_fill(poisoned[..., None], float("nan"))

    # (3) each chunk's own contribution to the state at its last step (its entering state excluded).
    decay_to_end = decay[..., -1, :]  # (b, h, c, l)
    chunk_states = torch.einsum("bgjcl,bclgn,bclgjp->bcgjpn", by_group(decay_to_end), B_c,
                                by_group(x_dt, 3)).flatten(2, 3)  # (b, c, h, p, n)

    # (4) pass states across chunks.
    if initial_states is None:
        initial_states = x.new_zeros(batch, nheads, headdim, B.shape[-1])
    carry = decay_from_start[..., -1]  # (b, h, c): zero where a sequence starts in the chunk
    entering, final_states = _pass_states(initial_states.to(dtype), carry, chunk_states)

    # (5) entering states seen through the decay up to each step.
    y = y + torch.einsum("bclgn,bcgjpn,bgjcl->bclgjp", C_c, by_group(entering, 2),
                         by_group(decay_from_start)).flatten(3, 4)

    y = y.reshape(batch, padded, nheads, headdim)[:, :seqlen]
    if D is not None:
        D = D.to(dtype)
        y = y + x.to(dtype) * (D[:, None] if D.dim() == 1 else D)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    out = y.to(x.dtype)

    results = [out]
    if return_final_states:
        results.append(final_states)
    if return_varlen_states:
        results.append(_states_at_ends(cu_seqlens, chunk_size, entering, decay, decay_from_start, B_c,
                                       by_group(x_dt, 3)))
    return out if len(results) == 1 else tuple(results)


def _states_at_ends(cu_seqlens, chunk_size, entering, decay, decay_from_start, B_c, x_dt):
    """State after the last step of each packed sequence (batch 1): (num_seqs, nheads, headdim, N).

    B_c: (b, c, l, g, n); x_dt: (b, c, l, g, heads per group, p). The state at step t of chunk c is its
    entering state times decay_from_start plus the chunk's inputs up to t, each through decay(s -> t); both
    are already masked by sequence.
    """
    ends = cu_seqlens[1:].long() - 1
    c, t = ends // chunk_size, ends % chunk_size
    from_entering = decay_from_start[0][:, c, t][..., None, None] * entering[0, c].transpose(0, 1)
    weights = decay[0][:, c, t, :].unflatten(0, x_dt.shape[3:5])  # (g, j, num_seqs, l)
    from_inputs = torch.einsum("gjsl,slgn,slgjp->gjspn", weights, B_c[0, c], x_dt[0, c]).flatten(0, 1)
    return (from_entering + from_inputs).transpose(0, 1)
