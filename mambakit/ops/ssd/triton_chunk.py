"""Triton kernels for the chunked Mamba-2 SSD, forward and backward.

Layout: time is cut into chunks of Q steps (the state is stored once per chunk), and each chunk
into blocks of BT rows (the unit of every tensor-core product). Within a chunk, cs is the
cumulative sum of a = dt * A from the chunk's start; decays are always exp of a difference of cs
that is <= 0 (masked before the exp), so nothing overflows however large |A dt| is.

Forward, four launches:
  0. `_chunk_cb`: C_t . B_s within each chunk, once per group (every head of the group reads it).
  1. `_chunk_state_fwd`: dt processing, cs, and each chunk's own state sum_s exp(cs_last - cs_s) dt_s x_s B_s^T.
  2. `_state_passing`: the recurrence over chunks, S_in[c+1] = exp(cs_last[c]) S_in[c] + local[c].
  3. `_chunk_scan_fwd`: y_t = exp(cs_t) C_t S_in^T + sum_{s<=t} (C_t.B_s) exp(cs_t - cs_s) dt_s x_s + D x_t, gated.
Backward, five launches: the mirror of 1 and 2 for the state gradients; the per-head gradients
of a block (dx, dz, dD, and the gradients of dt and of cs); dB and dC, looping over the heads of
a group so that they are summed on chip; and the dt-side gradients (reverse cumsum of the cs
gradient within the chunk, softplus, clamp, A, dt_bias).
seq_idx (numbered 0, 1, 2, ...) masks every term that would cross a sequence boundary.
"""
from __future__ import annotations

import triton
import triton.language as tl

from mambakit.ops._triton import program_index


@triton.jit
def _process_dt(dt, bias, dt_min, dt_max, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """dt + bias -> softplus -> clamp, in fp32 (softplus is the identity above 20, as in torch)."""
    dt = dt + bias
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    return dt


@triton.jit
def _load_dt(dt_ptr, bias_ptr, b, h, t, mask, sdt_b, sdt_t, dt_min, dt_max,
             HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """Processed dt at steps t of (batch b, head h); 0 on masked steps (no input, decay 1)."""
    raw = tl.load(dt_ptr + b * sdt_b + t * sdt_t + h, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + h).to(tl.float32) if HAS_BIAS else 0.0
    return tl.where(mask, _process_dt(raw, bias, dt_min, dt_max, SOFTPLUS, HAS_LIMIT), 0.0)


@triton.jit
def _load_rows(ptr, t, mask, row_stride, col_offset, cols, ncols):
    """Tile (len(t), len(cols)) of a (..., L, ..., ncols) tensor whose row t starts at t * row_stride + col_offset."""
    return tl.load(ptr + t[:, None] * row_stride + col_offset + cols[None, :],
                   mask=mask[:, None] & (cols[None, :] < ncols), other=0.0)


@triton.jit
def _chunk_state_fwd(x_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, seq_ptr, dtp_ptr, cs_ptr, states_ptr,
                     L, H, G, P, N, NCHUNKS, dt_min, dt_max, sx_b, sx_t, sdt_b, sdt_t, sb_b, sb_t,
                     HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
                     HAS_SEQ: tl.constexpr, Q: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
                     BN: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr):
    """Grid (batch * nheads, nchunks): writes dt, cs (batch, nheads, nchunks, Q) and the local state (P, N)."""
    c = program_index(1, WIDE)
    bh = program_index(0, WIDE)
    b, h = bh // H, bh % H
    g = h // (H // G)
    A = tl.load(A_ptr + h).to(tl.float32)
    t0 = c * Q
    tq = t0 + tl.arange(0, Q)
    dt = _load_dt(dt_ptr, bias_ptr, b, h, tq, tq < L, sdt_b, sdt_t, dt_min, dt_max, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
    cs = tl.cumsum(dt * A, axis=0)
    buf = (bh * NCHUNKS + c) * Q + tl.arange(0, Q)
    tl.store(dtp_ptr + buf, dt)
    tl.store(cs_ptr + buf, cs)
    cs_last = tl.sum(dt * A, axis=0)
    if HAS_SEQ:
        seq_last = tl.load(seq_ptr + b * L + tl.minimum(t0 + Q - 1, L - 1))

    cols_p, cols_n, rows = tl.arange(0, BP), tl.arange(0, BN), tl.arange(0, BT)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    cs_before = 0.0
    for j in range(0, Q // BT):  # blocks past L load zeros and add nothing
        t = t0 + j * BT + rows
        m = t < L
        dtj = _load_dt(dt_ptr, bias_ptr, b, h, t, m, sdt_b, sdt_t, dt_min, dt_max, HAS_BIAS, SOFTPLUS, HAS_LIMIT)
        csj = cs_before + tl.cumsum(dtj * A, axis=0)
        cs_before += tl.sum(dtj * A, axis=0)
        w = tl.exp(cs_last - csj) * dtj
        if HAS_SEQ:
            seqj = tl.load(seq_ptr + b * L + t, mask=m, other=-1)
            w = tl.where(seqj == seq_last, w, 0.0)
        xj = _load_rows(x_ptr + b * sx_b, t, m, sx_t, h * P, cols_p, P)
        Bj = _load_rows(B_ptr + b * sb_b, t, m, sb_t, g * N, cols_n, N).to(xj.dtype)
        xw = (xj.to(tl.float32) * w[:, None]).to(xj.dtype)
        acc += tl.dot(tl.trans(xw), Bj, input_precision=PREC)
    tile = cols_p[:, None] * N + cols_n[None, :]
    tl.store(states_ptr + ((b * NCHUNKS + c) * H + h) * P * N + tile, acc,
             mask=(cols_p[:, None] < P) & (cols_n[None, :] < N))


@triton.jit
def _chunk_step_loads(states_ptr, cs_ptr, seq_ptr, other_ptr, i, b, h, bh, tile, mask, L, H, P, N, NCHUNKS,
                      HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, Q: tl.constexpr):
    """What step i of `_state_passing` reads: the chunk's tile, its carry, and (reverse) its entering state."""
    c = NCHUNKS - 1 - i if REVERSE else i
    carry = tl.exp(tl.load(cs_ptr + (bh * NCHUNKS + c) * Q + Q - 1))
    if HAS_SEQ:  # the carried state belongs to the sequence of the step before the chunk
        seq_prev = tl.load(seq_ptr + b * L + tl.maximum(c * Q - 1, 0))
        seq_last = tl.load(seq_ptr + b * L + tl.minimum(c * Q + Q - 1, L - 1))
        carry = tl.where(seq_prev == seq_last, carry, 0.0)
    offset = ((b * NCHUNKS + c) * H + h) * P * N + tile
    local = tl.load(states_ptr + offset, mask=mask, other=0.0)
    if REVERSE:
        s_in = tl.load(other_ptr + offset, mask=mask, other=0.0)
    else:
        s_in = local
    return local, carry, s_in


@triton.jit
def _state_passing(states_ptr, cs_ptr, seq_ptr, init_ptr, final_ptr, other_ptr, dlast_ptr,
                   L, H, P, N, NCHUNKS,
                   HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
                   Q: tl.constexpr, BPS: tl.constexpr, BN: tl.constexpr, WIDE: tl.constexpr = True):
    """Grid (batch * nheads, cdiv(P, BPS)). The recurrence over chunks, in place on `states`.

    Forward: states holds each chunk's local state and becomes the state entering each chunk;
    `final` gets the state after the last chunk, `init` starts it.
    Reverse: states holds each chunk's direct gradient sum_t exp(cs_t) dY_t^T C_t and becomes the
    gradient of the state leaving each chunk; `init` is the gradient of the final state, `final`
    gets the gradient of the initial state, and dlast (batch, nheads, nchunks, cdiv(P, BPS)) the
    gradient of each chunk's cs_last through the carry: carry * <S_in, dS_out> (S_in from `other`).
    """
    bh = program_index(0, WIDE)
    pb = program_index(1, WIDE)
    b, h = bh // H, bh % H
    cols_p = pb * BPS + tl.arange(0, BPS)
    cols_n = tl.arange(0, BN)
    tile = cols_p[:, None] * N + cols_n[None, :]
    mask = (cols_p[:, None] < P) & (cols_n[None, :] < N)
    if HAS_INIT:
        acc = tl.load(init_ptr + bh * P * N + tile, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BPS, BN), dtype=tl.float32)
    # Each step's loads are issued one step ahead: the loop is bound by memory latency, not work.
    local, carry, s_in = _chunk_step_loads(states_ptr, cs_ptr, seq_ptr, other_ptr, 0, b, h, bh, tile, mask,
                                           L, H, P, N, NCHUNKS, HAS_SEQ, REVERSE, Q)
    for i in range(0, NCHUNKS):
        c = NCHUNKS - 1 - i if REVERSE else i
        next_local, next_carry, next_s_in = _chunk_step_loads(
            states_ptr, cs_ptr, seq_ptr, other_ptr, tl.minimum(i + 1, NCHUNKS - 1), b, h, bh, tile, mask,
            L, H, P, N, NCHUNKS, HAS_SEQ, REVERSE, Q)
        if REVERSE:
            tl.store(dlast_ptr + (bh * NCHUNKS + c) * tl.num_programs(1) + pb, carry * tl.sum(s_in * acc))
        tl.store(states_ptr + ((b * NCHUNKS + c) * H + h) * P * N + tile, acc, mask=mask)
        acc = carry * acc + local
        local, carry, s_in = next_local, next_carry, next_s_in
    tl.store(final_ptr + bh * P * N + tile, acc, mask=mask)


@triton.jit
def _intra_mask(t_rows, t_cols, seq_rows, seq_cols, cs_rows, cs_cols, HAS_SEQ: tl.constexpr):
    """(keep, decay): keep[t, s] = s <= t within one sequence; decay = exp(cs_t - cs_s) where kept, else 0."""
    keep = t_rows[:, None] >= t_cols[None, :]
    if HAS_SEQ:
        keep = keep & (seq_rows[:, None] == seq_cols[None, :])
    decay = tl.exp(tl.where(keep, cs_rows[:, None] - cs_cols[None, :], 0.0))
    return keep, tl.where(keep, decay, 0.0)


@triton.jit
def _chunk_cb(B_ptr, C_ptr, cb_ptr, L, G, N, NCHUNKS, sb_b, sb_t, sc_b, sc_t,
              Q: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr):
    """Grid (nchunks * NB * NB, batch * ngroups): cb[b, c, g, t, s] = C_t . B_s for the blocks on or
    below the diagonal, computed once per group and read by every head of it (fp32)."""
    NB: tl.constexpr = Q // BT
    c = program_index(0, WIDE) // (NB * NB)
    i = program_index(0, WIDE) // NB % NB
    j = program_index(0, WIDE) % NB
    bg = program_index(1, WIDE)
    b, g = bg // G, bg % G
    if (j > i) | (c * Q + i * BT >= L):
        return
    rows, cols_n = tl.arange(0, BT), tl.arange(0, BN)
    ti, tj = c * Q + i * BT + rows, c * Q + j * BT + rows
    Ci = _load_rows(C_ptr + b * sc_b, ti, ti < L, sc_t, g * N, cols_n, N)
    Bj = _load_rows(B_ptr + b * sb_b, tj, tj < L, sb_t, g * N, cols_n, N).to(Ci.dtype)
    cb = tl.dot(Ci, tl.trans(Bj), input_precision=PREC)
    tl.store(_cb_tile(cb_ptr, bg, c, i, j, NCHUNKS, Q, BT), cb)


@triton.jit
def _cb_tile(cb_ptr, bg, c, i, j, NCHUNKS, Q: tl.constexpr, BT: tl.constexpr):
    """Pointers to the (BT, BT) tile (rows block i, columns block j) of chunk c's C B^T."""
    rows = tl.arange(0, BT)
    return (cb_ptr + (bg * NCHUNKS + c) * Q * Q + (i * BT + rows)[:, None] * Q + j * BT + rows[None, :])


@triton.jit
def _chunk_scan_fwd(x_ptr, z_ptr, C_ptr, cb_ptr, D_ptr, states_ptr, cs_ptr, dtp_ptr, seq_ptr, out_ptr, y_ptr,
                    L, H, G, P, N, NCHUNKS, sx_b, sx_t, sc_b, sc_t,
                    HAS_Z: tl.constexpr, HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr,
                    HAS_SEQ: tl.constexpr, STORE_Y: tl.constexpr, Q: tl.constexpr, BT: tl.constexpr,
                    BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr, WIDE: tl.constexpr):
    """Grid (nheads * Q // BT, nchunks, batch): the outputs of one block of rows. A chunk's programs run
    side by side, heads fastest, so its C B^T tiles and each head's entering state come from memory once
    and from L2 for the other heads and row blocks. x and C rows are strided (s*_b, s*_t); z, y and out are
    contiguous."""
    block_head = program_index(0, WIDE)
    i, h = block_head // H, block_head % H
    c = program_index(1, WIDE)
    b = program_index(2, WIDE)
    bh = b * H + h
    g = h // (H // G)
    if c * Q + i * BT >= L:
        return
    rows = tl.arange(0, BT)
    cols_p, cols_n = tl.arange(0, BP), tl.arange(0, BN)
    ti = c * Q + i * BT + rows
    mi = ti < L
    buf = (bh * NCHUNKS + c) * Q
    cs_i = tl.load(cs_ptr + buf + i * BT + rows)
    x_b = x_ptr + b * sx_b
    Ci = _load_rows(C_ptr + b * sc_b, ti, mi, sc_t, g * N, cols_n, N)
    dot_type = x_ptr.dtype.element_ty
    Ci = Ci.to(dot_type)
    seq_i = tl.load(seq_ptr + b * L + ti, mask=mi, other=-1) if HAS_SEQ else rows

    # Inter-chunk: the entering state seen through the decay since the chunk's start.
    e = tl.exp(cs_i)
    if HAS_SEQ:
        e = tl.where(seq_i == tl.load(seq_ptr + b * L + tl.maximum(c * Q - 1, 0)), e, 0.0)
    S = tl.load(states_ptr + ((b * NCHUNKS + c) * H + h) * P * N + cols_p[:, None] * N + cols_n[None, :],
                mask=(cols_p[:, None] < P) & (cols_n[None, :] < N), other=0.0)
    acc = tl.dot(Ci, tl.trans(S.to(dot_type)), input_precision=PREC) * e[:, None]

    # Intra-chunk: blocks j <= i, the causal masked form. A later row must not reach an earlier one, NaN
    # included (0 * NaN is NaN): masked weights are filled, not multiplied, and in the diagonal block
    # non-finite inputs enter the product as zeros and make the rows they reach NaN instead.
    poisoned = rows < 0
    for j in range(0, i + 1):
        tj = c * Q + j * BT + rows
        mj = tj < L
        cs_j = tl.load(cs_ptr + buf + j * BT + rows)
        dt_j = tl.load(dtp_ptr + buf + j * BT + rows)
        seq_j = tl.load(seq_ptr + b * L + tj, mask=mj, other=-2) if HAS_SEQ else rows
        xj = _load_rows(x_b, tj, mj, sx_t, h * P, cols_p, P)
        keep, decay = _intra_mask(ti, tj, seq_i, seq_j, cs_i, cs_j, HAS_SEQ)
        cb = tl.load(_cb_tile(cb_ptr, b * G + g, c, i, j, NCHUNKS, Q, BT))
        scores = tl.where(keep, cb * decay * dt_j[None, :], 0.0)
        if j == i:
            finite = tl.abs(xj.to(tl.float32)) < float("inf")  # false for NaN too
            bad_j = tl.sum(tl.where(finite, 0, 1), axis=1) > 0
            poisoned = tl.sum(tl.where(keep & bad_j[None, :], 1, 0), axis=1) > 0
            xj = tl.where(finite, xj, tl.zeros_like(xj))
        acc += tl.dot(scores.to(dot_type), xj, input_precision=PREC)
    acc = tl.where(poisoned[:, None], float("nan"), acc)

    xi = _load_rows(x_b, ti, mi, sx_t, h * P, cols_p, P).to(tl.float32)
    if HAS_D:
        if D_PER_CHANNEL:
            acc += xi * tl.load(D_ptr + h * P + cols_p, mask=cols_p < P, other=0.0)[None, :]
        else:
            acc += xi * tl.load(D_ptr + h)
    offs = ti[:, None] * H * P + h * P + cols_p[None, :]
    mask = mi[:, None] & (cols_p[None, :] < P)
    if STORE_Y:
        tl.store(y_ptr + b * L * H * P + offs, acc, mask=mask)
    if HAS_Z:
        zi = tl.load(z_ptr + b * L * H * P + offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * zi * tl.sigmoid(zi)
    tl.store(out_ptr + b * L * H * P + offs, acc, mask=mask)


@triton.jit
def _varlen_states(x_ptr, B_ptr, states_ptr, cs_ptr, dtp_ptr, seq_ptr, cu_ptr, out_ptr,
                   L, H, G, P, N, NCHUNKS, sx_t, sb_t,
                   Q: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Grid (num_seqs, nheads), batch 1: the state after the last step e of each packed sequence,
    from the entering state of e's chunk and that chunk's steps of the same sequence up to e."""
    k = program_index(0)
    h = program_index(1)
    g = h // (H // G)
    e = tl.load(cu_ptr + k + 1).to(tl.int32) - 1
    c = e // Q
    buf = (h * NCHUNKS + c) * Q
    cs_e = tl.load(cs_ptr + buf + e - c * Q)
    seq_e = tl.load(seq_ptr + e)
    carry = tl.where(tl.load(seq_ptr + tl.maximum(c * Q - 1, 0)) == seq_e, tl.exp(cs_e), 0.0)
    cols_p, cols_n, rows = tl.arange(0, BP), tl.arange(0, BN), tl.arange(0, BT)
    tile = cols_p[:, None] * N + cols_n[None, :]
    mask = (cols_p[:, None] < P) & (cols_n[None, :] < N)
    acc = carry * tl.load(states_ptr + (c * H + h) * P * N + tile, mask=mask, other=0.0)
    for j in range(0, Q // BT):
        t = c * Q + j * BT + rows
        m = t <= e
        seq_t = tl.load(seq_ptr + t, mask=m, other=-1)
        keep = m & (seq_t == seq_e)
        cs_t = tl.load(cs_ptr + buf + j * BT + rows)
        w = tl.where(keep, tl.exp(tl.where(keep, cs_e - cs_t, 0.0)) * tl.load(dtp_ptr + buf + j * BT + rows), 0.0)
        xt = _load_rows(x_ptr, t, m, sx_t, h * P, cols_p, P)
        Bt = _load_rows(B_ptr, t, m, sb_t, g * N, cols_n, N).to(xt.dtype)
        acc += tl.dot(tl.trans((xt.to(tl.float32) * w[:, None]).to(xt.dtype)), Bt, input_precision=PREC)
    tl.store(out_ptr + (k * H + h) * P * N + tile, acc, mask=mask)


@triton.jit
def _gated_dy(dout_ptr, z_ptr, offs, mask, HAS_Z: tl.constexpr):
    """Gradient reaching y: dout * silu(z) (just dout without a gate), fp32."""
    dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = dy * zv * tl.sigmoid(zv)
    return dy


@triton.jit
def _chunk_dstate_direct(dout_ptr, z_ptr, C_ptr, cs_ptr, seq_ptr, dstates_ptr,
                         L, H, G, P, N, NCHUNKS,
                         HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr, BT: tl.constexpr,
                         BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Grid (batch * nheads, nchunks): sum_t exp(cs_t) dY_t^T C_t, the gradient of the entering
    state through this chunk's own outputs (rows of another sequence excluded)."""
    c = program_index(1)
    bh = program_index(0)
    b, h = bh // H, bh % H
    g = h // (H // G)
    cols_p, cols_n, rows = tl.arange(0, BP), tl.arange(0, BN), tl.arange(0, BT)
    if HAS_SEQ:
        seq_prev = tl.load(seq_ptr + b * L + tl.maximum(c * Q - 1, 0))
    dot_type = C_ptr.dtype.element_ty
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for j in range(0, Q // BT):
        t = c * Q + j * BT + rows
        m = t < L
        e = tl.exp(tl.load(cs_ptr + (bh * NCHUNKS + c) * Q + j * BT + rows))
        if HAS_SEQ:
            e = tl.where(tl.load(seq_ptr + b * L + t, mask=m, other=-1) == seq_prev, e, 0.0)
        offs = b * L * H * P + t[:, None] * H * P + h * P + cols_p[None, :]
        dy = _gated_dy(dout_ptr, z_ptr, offs, m[:, None] & (cols_p[None, :] < P), HAS_Z)
        Cj = _load_rows(C_ptr + b * L * G * N, t, m, G * N, g * N, cols_n, N)
        acc += tl.dot(tl.trans((dy * e[:, None]).to(dot_type)), Cj, input_precision=PREC)
    tl.store(dstates_ptr + ((b * NCHUNKS + c) * H + h) * P * N + cols_p[:, None] * N + cols_n[None, :], acc,
             mask=(cols_p[:, None] < P) & (cols_n[None, :] < N))


@triton.jit
def _chunk_scan_bwd_dx(x_ptr, z_ptr, dout_ptr, y_ptr, B_ptr, C_ptr, cb_ptr, D_ptr, states_ptr, dstates_ptr,
                       cs_ptr, dtp_ptr, seq_ptr, dx_ptr, dz_ptr, ddt_ptr, dcs_ptr, dstate_w_ptr, dD_ptr,
                       L, H, G, P, N, NCHUNKS,
                       HAS_Z: tl.constexpr, HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr,
                       HAS_SEQ: tl.constexpr, Q: tl.constexpr, BT: tl.constexpr,
                       BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Grid (batch * nheads, nchunks * Q // BT): the per-head gradients of block k.

    As columns s: dx, dt's direct gradient (dt as a multiplier) and the -s side of dcs (intra
    over blocks i >= k). As rows t: the +t side of dcs (intra over j <= k, and the entering
    state). dcs leaves out the diagonal s = t, whose decay exp(0) depends on no a, so that no
    large +x - x pair is ever summed. dstate_w: the gradient of each step's state weight
    exp(cs_last - cs_s) (times that weight), which `_dt_bwd` spreads over the steps after s.
    Also dz and dD (per block).
    """
    NB: tl.constexpr = Q // BT
    c, k = program_index(1) // NB, program_index(1) % NB
    bh = program_index(0)
    b, h = bh // H, bh % H
    g = h // (H // G)
    bg = b * G + g
    if c * Q + k * BT >= L:
        return
    rows = tl.arange(0, BT)
    cols_p, cols_n = tl.arange(0, BP), tl.arange(0, BN)
    tk = c * Q + k * BT + rows
    mk = tk < L
    n_blocks = tl.minimum(NB, tl.cdiv(L - c * Q, BT))
    dot_type = x_ptr.dtype.element_ty
    buf = (bh * NCHUNKS + c) * Q
    cs_k = tl.load(cs_ptr + buf + k * BT + rows)
    dt_k = tl.load(dtp_ptr + buf + k * BT + rows)
    cs_last = tl.load(cs_ptr + buf + Q - 1)
    seq_k = tl.load(seq_ptr + b * L + tk, mask=mk, other=-1) if HAS_SEQ else rows
    pmask = mk[:, None] & (cols_p[None, :] < P)
    offs_k = b * L * H * P + tk[:, None] * H * P + h * P + cols_p[None, :]
    xk = tl.load(x_ptr + offs_k, mask=pmask, other=0.0)
    dyk = _gated_dy(dout_ptr, z_ptr, offs_k, pmask, HAS_Z)
    if HAS_Z:  # dz = dout * y * silu'(z)
        zk = tl.load(z_ptr + offs_k, mask=pmask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(zk)
        dz = (tl.load(dout_ptr + offs_k, mask=pmask, other=0.0).to(tl.float32)
              * tl.load(y_ptr + offs_k, mask=pmask, other=0.0).to(tl.float32) * sig * (1.0 + zk * (1.0 - sig)))
        tl.store(dz_ptr + offs_k, dz, mask=pmask)
    dyk_dot = dyk.to(dot_type)
    state_tile = cols_p[:, None] * N + cols_n[None, :]
    state_mask = (cols_p[:, None] < P) & (cols_n[None, :] < N)
    state_offset = ((b * NCHUNKS + c) * H + h) * P * N

    # Rows k, entering state: y_t += exp(cs_t) C_t S_in^T, so dcs_t += dY_t . (that term).
    e = tl.exp(cs_k)
    if HAS_SEQ:
        e = tl.where(seq_k == tl.load(seq_ptr + b * L + tl.maximum(c * Q - 1, 0)), e, 0.0)
    Ck = _load_rows(C_ptr + b * L * G * N, tk, mk, G * N, g * N, cols_n, N).to(dot_type)
    s_in = tl.load(states_ptr + state_offset + state_tile, mask=state_mask, other=0.0).to(dot_type)
    dcs = e * tl.sum(dyk * tl.dot(Ck, tl.trans(s_in), input_precision=PREC), axis=1)

    # Rows k, intra-chunk: columns j <= k.
    for j in range(0, k + 1):
        tj = c * Q + j * BT + rows
        mj = tj < L
        cs_j = tl.load(cs_ptr + buf + j * BT + rows)
        dt_j = tl.load(dtp_ptr + buf + j * BT + rows)
        seq_j = tl.load(seq_ptr + b * L + tj, mask=mj, other=-2) if HAS_SEQ else rows
        xj = _load_rows(x_ptr + b * L * H * P, tj, mj, H * P, h * P, cols_p, P)
        _, decay = _intra_mask(tk, tj, seq_k, seq_j, cs_k, cs_j, HAS_SEQ)
        dP = tl.dot(dyk_dot, tl.trans(xj), input_precision=PREC)
        strict = tk[:, None] > tj[None, :]
        dcs += tl.sum(tl.where(strict, dP * tl.load(_cb_tile(cb_ptr, bg, c, k, j, NCHUNKS, Q, BT)), 0.0)
                      * decay * dt_j[None, :], axis=1)

    # Columns k, intra-chunk: rows i >= k.
    dx = tl.zeros((BT, BP), dtype=tl.float32)
    ddt = tl.zeros((BT,), dtype=tl.float32)
    for i in range(k, n_blocks):
        ti = c * Q + i * BT + rows
        mi = ti < L
        cs_i = tl.load(cs_ptr + buf + i * BT + rows)
        seq_i = tl.load(seq_ptr + b * L + ti, mask=mi, other=-1) if HAS_SEQ else rows
        offs_i = b * L * H * P + ti[:, None] * H * P + h * P + cols_p[None, :]
        dyi = _gated_dy(dout_ptr, z_ptr, offs_i, mi[:, None] & (cols_p[None, :] < P), HAS_Z).to(dot_type)
        _, decay = _intra_mask(ti, tk, seq_i, seq_k, cs_i, cs_k, HAS_SEQ)
        scores = tl.load(_cb_tile(cb_ptr, bg, c, i, k, NCHUNKS, Q, BT)) * decay  # (rows i, cols k), no dt
        dP = tl.dot(dyi, tl.trans(xk), input_precision=PREC)
        dx += tl.dot(tl.trans((scores * dt_k[None, :]).to(dot_type)), dyi, input_precision=PREC)
        ddt += tl.sum(dP * scores, axis=0)
        dcs -= tl.sum(tl.where(ti[:, None] > tk[None, :], dP * scores, 0.0), axis=0) * dt_k

    # Columns k, the chunk's state: S_out += exp(cs_last - cs_s) dt_s x_s B_s^T.
    w = tl.exp(cs_last - cs_k)
    if HAS_SEQ:
        w = tl.where(seq_k == tl.load(seq_ptr + b * L + tl.minimum(c * Q + Q - 1, L - 1)), w, 0.0)
    Bk = _load_rows(B_ptr + b * L * G * N, tk, mk, G * N, g * N, cols_n, N).to(dot_type)
    ds_out = tl.load(dstates_ptr + state_offset + state_tile, mask=state_mask, other=0.0).to(dot_type)
    v = tl.dot(Bk, tl.trans(ds_out), input_precision=PREC)  # (BT, BP)
    dx += v * (w * dt_k)[:, None]
    sx = w * tl.sum(xk.to(tl.float32) * v, axis=1)
    ddt += sx
    tl.store(dstate_w_ptr + buf + k * BT + rows, sx * dt_k)

    if HAS_D:
        xk32 = xk.to(tl.float32)
        if D_PER_CHANNEL:
            dx += dyk * tl.load(D_ptr + h * P + cols_p, mask=cols_p < P, other=0.0)[None, :]
            tl.store(dD_ptr + ((b * NCHUNKS + c) * NB + k) * H * P + h * P + cols_p,
                     tl.sum(dyk * xk32, axis=0), mask=cols_p < P)
        else:
            dx += dyk * tl.load(D_ptr + h)
            tl.store(dD_ptr + ((b * NCHUNKS + c) * NB + k) * H + h, tl.sum(dyk * xk32))
    tl.store(dx_ptr + offs_k, dx, mask=pmask)
    tl.store(ddt_ptr + buf + k * BT + rows, ddt)
    tl.store(dcs_ptr + buf + k * BT + rows, dcs)


@triton.jit
def _chunk_scan_bwd_dbdc(x_ptr, z_ptr, dout_ptr, B_ptr, C_ptr, states_ptr, dstates_ptr, cs_ptr, dtp_ptr, seq_ptr,
                         dB_ptr, dC_ptr, L, H, G, P, N, NCHUNKS, HEADS_PER_SPLIT, SPLIT_STRIDE,
                         HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, Q: tl.constexpr, BT: tl.constexpr,
                         BP: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Grid (nchunks * Q // BT, batch * ngroups, head splits): dB and dC of block k, summed over
    a split of the group's heads. The score gradient dG = (dY x^T) * decay * dt is summed over
    heads before its one product with B (rows k) or C (columns k) per block pair."""
    NB: tl.constexpr = Q // BT
    c, k = program_index(0) // NB, program_index(0) % NB
    bg = program_index(1)
    b, g = bg // G, bg % G
    split = program_index(2)
    if c * Q + k * BT >= L:
        return
    rows = tl.arange(0, BT)
    cols_p, cols_n = tl.arange(0, BP), tl.arange(0, BN)
    tk = c * Q + k * BT + rows
    mk = tk < L
    n_blocks = tl.minimum(NB, tl.cdiv(L - c * Q, BT))
    dot_type = x_ptr.dtype.element_ty
    seq_k = tl.load(seq_ptr + b * L + tk, mask=mk, other=-1) if HAS_SEQ else rows
    pmask = mk[:, None] & (cols_p[None, :] < P)
    state_tile = cols_p[:, None] * N + cols_n[None, :]
    state_mask = (cols_p[:, None] < P) & (cols_n[None, :] < N)
    heads_per_group = H // G
    h_start = g * heads_per_group + split * HEADS_PER_SPLIT
    h_end = tl.minimum(h_start + HEADS_PER_SPLIT, (g + 1) * heads_per_group)
    dB = tl.zeros((BT, BN), dtype=tl.float32)
    dC = tl.zeros((BT, BN), dtype=tl.float32)

    # Through the states: rows k read the entering state, columns k feed the chunk's state.
    for h in range(h_start, h_end):
        buf = ((b * H + h) * NCHUNKS + c) * Q
        cs_k = tl.load(cs_ptr + buf + k * BT + rows)
        dt_k = tl.load(dtp_ptr + buf + k * BT + rows)
        e = tl.exp(cs_k)
        w = tl.exp(tl.load(cs_ptr + buf + Q - 1) - cs_k) * dt_k
        if HAS_SEQ:
            e = tl.where(seq_k == tl.load(seq_ptr + b * L + tl.maximum(c * Q - 1, 0)), e, 0.0)
            w = tl.where(seq_k == tl.load(seq_ptr + b * L + tl.minimum(c * Q + Q - 1, L - 1)), w, 0.0)
        offs_k = b * L * H * P + tk[:, None] * H * P + h * P + cols_p[None, :]
        dyk = _gated_dy(dout_ptr, z_ptr, offs_k, pmask, HAS_Z)
        xk = tl.load(x_ptr + offs_k, mask=pmask, other=0.0).to(tl.float32)
        state_offset = ((b * NCHUNKS + c) * H + h) * P * N + state_tile
        s_in = tl.load(states_ptr + state_offset, mask=state_mask, other=0.0).to(dot_type)
        ds_out = tl.load(dstates_ptr + state_offset, mask=state_mask, other=0.0).to(dot_type)
        dC += tl.dot((dyk * e[:, None]).to(dot_type), s_in, input_precision=PREC)
        dB += tl.dot((xk * w[:, None]).to(dot_type), ds_out, input_precision=PREC)

    # dC, intra-chunk: columns j <= k.
    for j in range(0, k + 1):
        tj = c * Q + j * BT + rows
        mj = tj < L
        seq_j = tl.load(seq_ptr + b * L + tj, mask=mj, other=-2) if HAS_SEQ else rows
        dG = tl.zeros((BT, BT), dtype=tl.float32)
        for h in range(h_start, h_end):
            buf = ((b * H + h) * NCHUNKS + c) * Q
            cs_k = tl.load(cs_ptr + buf + k * BT + rows)
            cs_j = tl.load(cs_ptr + buf + j * BT + rows)
            dt_j = tl.load(dtp_ptr + buf + j * BT + rows)
            dyk = _gated_dy(dout_ptr, z_ptr, b * L * H * P + tk[:, None] * H * P + h * P + cols_p[None, :],
                            pmask, HAS_Z).to(dot_type)
            xj = _load_rows(x_ptr + b * L * H * P, tj, mj, H * P, h * P, cols_p, P)
            _, decay = _intra_mask(tk, tj, seq_k, seq_j, cs_k, cs_j, HAS_SEQ)
            dG += tl.dot(dyk, tl.trans(xj), input_precision=PREC) * decay * dt_j[None, :]
        Bj = _load_rows(B_ptr + b * L * G * N, tj, mj, G * N, g * N, cols_n, N).to(dot_type)
        dC += tl.dot(dG.to(dot_type), Bj, input_precision=PREC)

    # dB, intra-chunk: rows i >= k.
    for i in range(k, n_blocks):
        ti = c * Q + i * BT + rows
        mi = ti < L
        seq_i = tl.load(seq_ptr + b * L + ti, mask=mi, other=-1) if HAS_SEQ else rows
        dG = tl.zeros((BT, BT), dtype=tl.float32)
        for h in range(h_start, h_end):
            buf = ((b * H + h) * NCHUNKS + c) * Q
            cs_k = tl.load(cs_ptr + buf + k * BT + rows)
            cs_i = tl.load(cs_ptr + buf + i * BT + rows)
            dt_k = tl.load(dtp_ptr + buf + k * BT + rows)
            dyi = _gated_dy(dout_ptr, z_ptr, b * L * H * P + ti[:, None] * H * P + h * P + cols_p[None, :],
                            mi[:, None] & (cols_p[None, :] < P), HAS_Z).to(dot_type)
            xk = tl.load(x_ptr + b * L * H * P + tk[:, None] * H * P + h * P + cols_p[None, :], mask=pmask, other=0.0)
            _, decay = _intra_mask(ti, tk, seq_i, seq_k, cs_i, cs_k, HAS_SEQ)
            dG += tl.dot(dyi, tl.trans(xk), input_precision=PREC) * decay * dt_k[None, :]
        Ci = _load_rows(C_ptr + b * L * G * N, ti, mi, G * N, g * N, cols_n, N).to(dot_type)
        dB += tl.dot(tl.trans(dG.to(dot_type)), Ci, input_precision=PREC)

    nmask = mk[:, None] & (cols_n[None, :] < N)
    offs_n = split * SPLIT_STRIDE + b * L * G * N + tk[:, None] * G * N + g * N + cols_n[None, :]
    tl.store(dB_ptr + offs_n, dB, mask=nmask)
    tl.store(dC_ptr + offs_n, dC, mask=nmask)


@triton.jit
def _dt_bwd(dt_ptr, bias_ptr, A_ptr, dtp_ptr, dcs_ptr, ddt_ptr, dstate_w_ptr, dcarry_ptr,
            ddt_out_ptr, dA_ptr, dbias_ptr,
            L, H, NCHUNKS, N_CARRY, dt_min, dt_max,
            HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
            Q: tl.constexpr, BCARRY: tl.constexpr):
    """Grid (nchunks, batch * nheads): the gradient of each a = dt * A, then those of dt (through
    softplus and clamp), A and dt_bias (the last two per chunk).

    a_u enters cs_t for t >= u (da_u: reverse cumsum of dcs), the state weight exp(cs_last - cs_s)
    for s < u (prefix sum of dstate_w before u), and the carry exp(cs_last) for every u."""
    c = program_index(0)
    bh = program_index(1)
    b, h = bh // H, bh % H
    q = tl.arange(0, Q)
    buf = (bh * NCHUNKS + c) * Q + q
    t = c * Q + q
    m = t < L
    dcs = tl.where(m, tl.load(dcs_ptr + buf), 0.0)  # steps past L: never written
    dstate_w = tl.where(m, tl.load(dstate_w_ptr + buf), 0.0)
    bc = tl.arange(0, BCARRY)
    dcarry = tl.sum(tl.load(dcarry_ptr + (bh * NCHUNKS + c) * N_CARRY + bc, mask=bc < N_CARRY, other=0.0))
    da = tl.cumsum(dcs, axis=0, reverse=True) + (tl.cumsum(dstate_w, axis=0) - dstate_w) + dcarry
    A = tl.load(A_ptr + h)
    dtp = tl.load(dtp_ptr + buf)
    tl.store(dA_ptr + bh * NCHUNKS + c, tl.sum(da * dtp))
    grad = tl.where(m, tl.load(ddt_ptr + buf) + da * A, 0.0)
    raw = tl.load(dt_ptr + (b * L + t) * H + h, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + h).to(tl.float32)
    if HAS_LIMIT:  # torch.clamp passes the gradient inside [min, max]
        pre = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(raw)), raw) if SOFTPLUS else raw
        grad = tl.where((pre >= dt_min) & (pre <= dt_max), grad, 0.0)
    if SOFTPLUS:
        grad = tl.where(raw <= 20.0, grad * tl.sigmoid(raw), grad)
    tl.store(ddt_out_ptr + (b * L + t) * H + h, grad, mask=m)
    tl.store(dbias_ptr + bh * NCHUNKS + c, tl.sum(grad))
