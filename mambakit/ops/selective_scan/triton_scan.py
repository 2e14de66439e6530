"""Selective scan (Mamba-1) as fused Triton kernels: forward, backward and the autograd Function.

Forward: one program owns BLOCK_D channels of one batch row (a channel's N states inside one or two
threads) and walks the sequence one step at a time, the state in registers: a step is N independent
exp/multiply-adds with next to no communication between threads. Inputs of any float dtype are read
once (in coalesced tiles of several steps) and everything is computed in fp32.

Sequence parallelism (forward): when batch x channel blocks alone do not fill the GPU, the sequence is
cut into chunks: pass 1 scans every chunk from a zero state (its end state and total decay), pass 2
chains the chunks, pass 3 rescans every chunk from its true start state and writes the outputs.

Backward: the forward stores the state at the start of every TILE_L-step tile (batch, dim, L / TILE_L,
N) fp32, about one byte per (batch, dim, step) at N=16, instead of the N states of every step. The
backward walks the tiles in reverse; in a tile, on a (BLOCK_D, N, TILE_L) register block, it rescans
the states from the stored one (an associative scan over (a, x) pairs), runs the adjoint recurrence
g_t = C_t dy_t + a_{t+1} g_{t+1} as a reverse associative scan and forms every gradient; B and C
gradients, summed over channels, are accumulated with atomic adds.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mambakit.ops._common import custom_op_if_compiling, eager_autograd
from mambakit.ops._triton import program_index, wide_offsets
from mambakit.ops.selective_scan import reference

TILE_L = 64  # steps per tile; the backward's checkpoint stride
# Measured best on an H200 over batch 1 x 128K-512K, 16 x 2K and 128 x 2K, d_inner 1536, N 16 (a sweep of
# channels, warps, unroll and programs per SM; benchmarks/results/kernels-h200-notes.md):
FWD_BLOCK_D, FWD_WARPS, FWD_UNROLL = 128, 4, 16  # channels per program, warps, steps unrolled
BWD_BLOCK_D, BWD_WARPS = 1, 1
BWD_MAXNREG = None  # a register cap for the backward (None: the compiler's choice; benchmarks/scan_bwd_sweep.py)
FWD_PROGRAMS_PER_SM = 8  # below this many programs per SM the forward also splits the sequence
MIN_CHUNK_TILES = 2  # the shortest sequence chunk, in tiles (H200, batch 1: 2 beat 1, 4 and 8 at 2K and 8K)
FORCE_CHUNKS = None  # tests set an int to exercise the sequence-parallel forward at tiny shapes


@triton.jit
def _affine_combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2 * (a1 * h + x1) + x2
    return a1 * a2, x1 * a2 + x2


@triton.jit
def _softplus(x):
    # log(1 + e^x) through the hardware exp2/log2; exact branches where 1 + e^x would round.
    e = tl.exp2(x * 1.4426950408889634)
    return tl.where(x > 20.0, x, tl.where(x < -15.0, e, tl.log2(1.0 + e) * 0.6931471805599453))


@triton.jit
def _load_tile(ptr, stride_d, stride_l, d, t, mask):
    """(BLOCK_D, BLOCK_L) fp32 tile of a (dim, L) slice; zero outside `mask`."""
    return tl.load(ptr + d[:, None] * stride_d + t[None, :] * stride_l, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _delta_tile(delta_ptr, s_dd, s_dl, bias, d, t, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Discretization step (BLOCK_D, BLOCK_L): delta (+ bias) (softplus); zero outside `mask`."""
    raw = _load_tile(delta_ptr, s_dd, s_dl, d, t, mask)
    if HAS_BIAS:
        raw += bias[:, None]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _pick(tile, pick):
    """tile[:, j] for the one column where `pick` is true, inside each thread: adding -0.0 is exact,
    so the compiler folds the masked sum down to that register."""
    return tl.sum(tl.where(pick, tile, -0.0), axis=1)


@triton.jit
def _decay(dt, A2, t, seq_ptr, s_sl, L, HAS_SEQ_IDX: tl.constexpr):
    """a_t = exp(dt * A) as (BLOCK_D, N, BLOCK_L); zero where a new sequence starts (seq_idx changes)."""
    a = tl.exp2(dt[:, None, :] * A2[:, :, None])
    if HAS_SEQ_IDX:
        inside = (t > 0) & (t < L)
        cur = tl.load(seq_ptr + t * s_sl, mask=inside, other=0)
        prev = tl.load(seq_ptr + (t - 1) * s_sl, mask=inside, other=0)
        a = tl.where((cur != prev)[None, None, :], 0.0, a)
    return a


@triton.jit
def _group_rows(ptr, stride_g, stride_n, stride_l, d, per_group, n, t, mask_d, mask_t, N: tl.constexpr):
    """B or C as (BLOCK_D, N, BLOCK_L) fp32, the row of each channel's group. Loaded in 3D on purpose:
    this load fixes the layout of every (BLOCK_D, N, BLOCK_L) block, a run of consecutive steps in each
    thread, so that most of the scan is sequential inside threads."""
    g = d // per_group
    offs = g[:, None, None] * stride_g + n[None, :, None] * stride_n + t[None, None, :] * stride_l
    mask = mask_d[:, None, None] & (n < N)[None, :, None] & mask_t[None, None, :]
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["s_n"])
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, h0_ptr,
    out_ptr, hend_ptr, decay_ptr, ckpt_ptr,
    dim, L, chunk_len, b_per_group, c_per_group, s_n,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_sb, s_sl,
    s_h0b, s_h0c, s_h0d, s_heb, s_hec, s_hed, s_kb, s_kd, s_kt,
    N: tl.constexpr, N_P2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, UNROLL: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, HAS_H0: tl.constexpr, WRITE_OUT: tl.constexpr,
    WRITE_DECAY: tl.constexpr, WRITE_CKPT: tl.constexpr, WIDE: tl.constexpr,
):
    """Scan one chunk of one batch row for BLOCK_D channels (inside one group of B and of C), one step
    at a time: the state (BLOCK_D, N) stays in registers, a channel's N states inside one thread (or two),
    so a step is N independent exp/multiply-adds with next to no communication. Grid (batch, dim blocks,
    chunks). u, delta, z and out move in (BLOCK_D, UNROLL) tiles, UNROLL steps per 16-byte access.

    h0 (batch, chunks, dim, N): start state of each chunk (HAS_H0). Writes the chunk's end state to
    hend (batch, chunks, dim, N), with WRITE_DECAY its total decay prod_t a_t to decay (same shape),
    with WRITE_OUT the outputs, with WRITE_CKPT the state at every BLOCK_L-step tile start to ckpt
    (batch, dim, tiles, N). B and C are best laid out (batch, G, L, N) (s_Bn = 1) so that a step's
    N values are adjacent. s_n = 1 is the N stride of A and of the states, passed unspecialized: were the
    compiler to see N contiguous there, it would spread N over threads to vectorize those few accesses.
    """
    pid_b = program_index(0, WIDE)
    pid_d = program_index(1, WIDE)
    pid_c = program_index(2, WIDE)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, N_P2)
    mask_d = d < dim
    mask_n = n < N
    mask_nd = mask_d[:, None] & mask_n[None, :]  # states are (BLOCK_D, N)
    A2 = tl.load(A_ptr + d[:, None] * N + n[None, :] * s_n, mask=mask_nd, other=0.0) * 1.4426950408889634
    # Loaded even when absent (a dummy pointer) so that every tensor exists; unused then.
    bias = tl.load(bias_ptr + d, mask=mask_d & HAS_BIAS, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + d, mask=mask_d & HAS_D, other=0.0).to(tl.float32)
    u_ptrs = u_ptr + pid_b * s_ub + d * s_ud
    delta_ptrs = delta_ptr + pid_b * s_db + d * s_dd
    z_ptrs = z_ptr + pid_b * s_zb + d * s_zd
    out_ptrs = out_ptr + pid_b * s_ob + d * s_od
    B_ptrs = B_ptr + pid_b * s_Bb + ((pid_d * BLOCK_D) // b_per_group) * s_Bg + n * s_Bn
    C_ptrs = C_ptr + pid_b * s_Cb + ((pid_d * BLOCK_D) // c_per_group) * s_Cg + n * s_Cn
    seq_ptr += pid_b * s_sb
    nd_off = d[:, None] * s_hed + n[None, :] * s_n
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_h0b + pid_c * s_h0c + d[:, None] * s_h0d + n[None, :] * s_n, mask=mask_nd,
                    other=0.0)
    else:
        h = tl.zeros((BLOCK_D, N_P2), tl.float32)
    total_decay = tl.full((BLOCK_D, N_P2), 1.0, tl.float32)
    t_start = pid_c * chunk_len
    t_end = tl.minimum(t_start + chunk_len, L)
    prev_seq = 0
    if HAS_SEQ_IDX:
        prev_seq = tl.load(seq_ptr + tl.maximum(t_start - 1, 0) * s_sl)
    col = tl.arange(0, UNROLL)
    for t0 in range(t_start, t_end, BLOCK_L):
        if WRITE_CKPT:
            tl.store(ckpt_ptr + pid_b * s_kb + d[:, None] * s_kd + n[None, :] * s_n + (t0 // BLOCK_L) * s_kt, h,
                     mask=mask_nd)
        for t1 in range(t0, t0 + BLOCK_L, UNROLL):
            # UNROLL steps of u, delta, z come in one coalesced (BLOCK_D, UNROLL) tile, a run of steps per
            # thread; a step's column is then picked out inside the thread (no per-step scattered loads).
            t = t1 + col
            live = t < t_end
            tile_mask = mask_d[:, None] & live[None, :]
            u_tile = tl.load(u_ptrs[:, None] + t[None, :] * s_ul, mask=tile_mask, other=0.0).to(tl.float32)
            dt_tile = tl.load(delta_ptrs[:, None] + t[None, :] * s_dl, mask=tile_mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt_tile += bias[:, None]
            if SOFTPLUS:
                dt_tile = _softplus(dt_tile)
            dt_tile = tl.where(live[None, :], dt_tile, 0.0)  # past the chunk: a = 1, x = 0, the state passes
            dtu_tile = dt_tile * u_tile
            y_tile = tl.zeros((BLOCK_D, UNROLL), tl.float32)
            for j in tl.static_range(UNROLL):
                pick = (col == j)[None, :]
                dt = _pick(dt_tile, pick)
                step_live = t1 + j < t_end
                Bt = tl.load(B_ptrs + (t1 + j) * s_Bl, mask=mask_n & step_live, other=0.0).to(tl.float32)
                a = tl.exp2(dt[:, None] * A2)
                if HAS_SEQ_IDX:
                    cur_seq = tl.load(seq_ptr + (t1 + j) * s_sl, mask=step_live, other=0)
                    a = tl.where(step_live & (cur_seq != prev_seq), 0.0, a)
                    prev_seq = cur_seq
                h = a * h + _pick(dtu_tile, pick)[:, None] * Bt[None, :]
                if WRITE_DECAY:
                    total_decay *= a
                if WRITE_OUT:
                    Ct = tl.load(C_ptrs + (t1 + j) * s_Cl, mask=mask_n & step_live, other=0.0).to(tl.float32)
                    y_tile = tl.where(pick, tl.sum(h * Ct[None, :], axis=1)[:, None], y_tile)
            if WRITE_OUT:
                if HAS_D:
                    y_tile += Dv[:, None] * u_tile
                if HAS_Z:
                    z_tile = tl.load(z_ptrs[:, None] + t[None, :] * s_zl, mask=tile_mask, other=0.0).to(tl.float32)
                    y_tile *= z_tile * tl.sigmoid(z_tile)
                tl.store(out_ptrs[:, None] + t[None, :] * s_ol, y_tile.to(out_ptr.dtype.element_ty), mask=tile_mask)
    end_off = pid_b * s_heb + pid_c * s_hec + nd_off
    tl.store(hend_ptr + end_off, h, mask=mask_nd)
    if WRITE_DECAY:
        tl.store(decay_ptr + end_off, total_decay, mask=mask_nd)


@triton.jit
def _chain_chunks_kernel(hend_ptr, decay_ptr, h0_ptr, n_chunks, s_b, s_c, DN, HAS_H0: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Pass 2: start state of chunk c+1 = decay_c * start_c + local_end_c, written over hend in place.

    hend, decay: (batch, chunks, dim, N) from pass 1; h0: (batch, dim, N). After this kernel hend[:, c]
    holds the true start state of chunk c (hend[:, 0] = h0 or zero).
    """
    pid_b = program_index(0)
    offs = program_index(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < DN
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * DN + offs, mask=mask, other=0.0)
    else:
        h = tl.zeros((BLOCK,), tl.float32)
    base = pid_b * s_b + offs
    for c in range(n_chunks):
        local_end = tl.load(hend_ptr + base + c * s_c, mask=mask, other=0.0)
        decay = tl.load(decay_ptr + base + c * s_c, mask=mask, other=0.0)
        tl.store(hend_ptr + base + c * s_c, h, mask=mask)
        h = decay * h + local_end


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, ckpt_ptr, dout_ptr, dhend_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, dh0_ptr,
    dim, L, n_tiles, b_per_group, c_per_group,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
    s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_sb, s_sl, s_kb, s_kd, s_kt,
    s_dBb, s_dBg, s_dBn, s_dCb, s_dCg, s_dCn,
    N: tl.constexpr, N_P2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, HAS_DHEND: tl.constexpr, WRITE_DH0: tl.constexpr,
):
    """Gradients of the scan for BLOCK_D channels of one batch row; grid (batch, dim blocks).

    du, ddelta, dz are written (batch, dim, L) with dout's strides (s_g*); dB, dC (batch, G, N, L) fp32,
    dA (dim, N), dD, dbias (dim,) fp32 are accumulated atomically; dh0 (batch, dim, N) is written.
    """
    pid_b = program_index(0)
    pid_d = program_index(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, N_P2)
    mask_d = d < dim
    mask_dn = mask_d[:, None] & (n[None, :] < N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    A2 = A * 1.4426950408889634
    # Loaded even when absent (a dummy pointer) so that every helper gets a tensor; unused then.
    bias = tl.load(bias_ptr + d, mask=mask_d & HAS_BIAS, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + d, mask=mask_d & HAS_D, other=0.0).to(tl.float32)
    u_ptr += pid_b * s_ub
    delta_ptr += pid_b * s_db
    z_ptr += pid_b * s_zb
    dout_ptr += pid_b * s_gb
    du_ptr += pid_b * s_gb
    ddelta_ptr += pid_b * s_gb
    dz_ptr += pid_b * s_gb
    B_ptr += pid_b * s_Bb
    C_ptr += pid_b * s_Cb
    dB_ptr += pid_b * s_dBb + ((pid_d * BLOCK_D) // b_per_group) * s_dBg
    dC_ptr += pid_b * s_dCb + ((pid_d * BLOCK_D) // c_per_group) * s_dCg
    seq_ptr += pid_b * s_sb
    if HAS_DHEND:
        dh_end = tl.load(dhend_ptr + pid_b * dim * N + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    else:
        dh_end = tl.zeros((BLOCK_D, N_P2), tl.float32)
    g_next = tl.zeros((BLOCK_D, N_P2), tl.float32)  # adjoint g at the first step of the tile after this one
    dA_acc = tl.zeros((BLOCK_D, N_P2), tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    col = tl.arange(0, BLOCK_L)
    for i in range(n_tiles):
        t0 = (n_tiles - 1 - i) * BLOCK_L
        t = t0 + col
        mask_t = t < L
        mask_dl = mask_d[:, None] & mask_t[None, :]
        mask_nl = (n[:, None] < N) & mask_t[None, :]
        h0 = tl.load(ckpt_ptr + pid_b * s_kb + d[:, None] * s_kd + (t0 // BLOCK_L) * s_kt + n[None, :],
                     mask=mask_dn, other=0.0)
        u = _load_tile(u_ptr, s_ud, s_ul, d, t, mask_dl)
        dt, raw = _delta_tile(delta_ptr, s_dd, s_dl, bias, d, t, mask_dl, HAS_BIAS, SOFTPLUS)
        Bt = _group_rows(B_ptr, s_Bg, s_Bn, s_Bl, d, b_per_group, n, t, mask_d, mask_t, N)
        Ct = _group_rows(C_ptr, s_Cg, s_Cn, s_Cl, d, c_per_group, n, t, mask_d, mask_t, N)
        # Recompute the states of this tile from its checkpoint.
        a = _decay(dt, A2, t, seq_ptr, s_sl, L, HAS_SEQ_IDX)
        dtu = dt * u
        x = dtu[:, None, :] * Bt
        a_cum, hs = tl.associative_scan((a, x), 2, _affine_combine)
        hs += a_cum * h0[:, :, None]
        dout = _load_tile(dout_ptr, s_gd, s_gl, d, t, mask_dl)
        if HAS_Z:
            y = tl.sum(hs * Ct, axis=1)
            if HAS_D:
                y += Dv[:, None] * u
            zt = _load_tile(z_ptr, s_zd, s_zl, d, t, mask_dl)
            sz = tl.sigmoid(zt)
            dz = dout * y * sz * (1.0 + zt * (1.0 - sz))
            tl.store(dz_ptr + d[:, None] * s_gd + t[None, :] * s_gl, dz.to(dz_ptr.dtype.element_ty), mask=mask_dl)
            dy = dout * zt * sz
        else:
            dy = dout
        # Adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}, as a reverse scan; a_{t+1} from the next step's delta.
        mask_next = mask_d[:, None] & (t + 1 < L)[None, :]
        dt_next, _ = _delta_tile(delta_ptr, s_dd, s_dl, bias, d, t + 1, mask_next, HAS_BIAS, SOFTPLUS)
        a_next = _decay(dt_next, A2, t + 1, seq_ptr, s_sl, L, HAS_SEQ_IDX)
        a_next = tl.where((t + 1 < L)[None, None, :], a_next, 0.0)
        c = Ct * dy[:, None, :]
        if HAS_DHEND:
            c += tl.where((t == L - 1)[None, None, :], dh_end[:, :, None], 0.0)
        a_rcum, g = tl.associative_scan((a_next, c), 2, _affine_combine, reverse=True)
        g += a_rcum * g_next[:, :, None]
        g_next = tl.sum(tl.where((col == 0)[None, None, :], g, 0.0), axis=2)
        # a_t h_{t-1} = h_t - x_t: the decay's share of h_t, without shifting registers.
        g_decay = g * (hs - x)
        gB = tl.sum(g * Bt, axis=1)
        ddt = gB * u + tl.sum(g_decay * A[:, :, None], axis=1)
        dA_acc += tl.sum(g_decay * dt[:, None, :], axis=2)
        du = gB * dt
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if SOFTPLUS:
            ddt *= tl.sigmoid(raw)
        ddt = tl.where(mask_dl, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + d[:, None] * s_gd + t[None, :] * s_gl, du.to(du_ptr.dtype.element_ty), mask=mask_dl)
        tl.store(ddelta_ptr + d[:, None] * s_gd + t[None, :] * s_gl, ddt.to(ddelta_ptr.dtype.element_ty),
                 mask=mask_dl)
        dB = tl.sum(g * dtu[:, None, :], axis=0)
        dC = tl.sum(hs * dy[:, None, :], axis=0)
        tl.atomic_add(dB_ptr + n[:, None] * s_dBn + t[None, :], dB, mask=mask_nl, sem="relaxed")
        tl.atomic_add(dC_ptr + n[:, None] * s_dCn + t[None, :], dC, mask=mask_nl, sem="relaxed")
    if WRITE_DH0:
        dt0, _ = _delta_tile(delta_ptr, s_dd, s_dl, bias, d, col, mask_d[:, None] & (col == 0)[None, :],
                             HAS_BIAS, SOFTPLUS)
        a0 = tl.exp2(tl.sum(dt0, axis=1)[:, None] * A2)
        tl.store(dh0_ptr + pid_b * dim * N + d[:, None] * N + n[None, :], a0 * g_next, mask=mask_dn)
    tl.atomic_add(dA_ptr + d[:, None] * N + n[None, :], dA_acc, mask=mask_dn, sem="relaxed")
    if HAS_D:
        tl.atomic_add(dD_ptr + d, dD_acc, mask=mask_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d, dbias_acc, mask=mask_d, sem="relaxed")


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) -> (batch, 1, N, L) view; (batch, G, N, L) unchanged."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _steps_major(t: torch.Tensor) -> torch.Tensor:
    """(batch, G, N, L) with a step's N values adjacent: t itself when they are (B and C cut from x_proj's
    output), else an fp32 copy laid out (batch, G, L, N) (one small copy)."""
    if t.stride(2) == 1:
        return t
    out = torch.empty(*t.shape[:2], t.shape[3], t.shape[2], device=t.device, dtype=torch.float32)
    return out.copy_(t.transpose(-1, -2)).transpose(-1, -2)


def _block_d(dim: int, B: torch.Tensor, C: torch.Tensor, block: int) -> int:
    """Channels per program: at most `block`, a power of two that keeps every program in one group of B and C."""
    for t in (B, C):
        groups = t.shape[1]
        if groups > 1:
            per_group = dim // groups
            block = min(block, per_group & -per_group)  # largest power of two dividing per_group
    return block


def _num_chunks(batch: int, dim_blocks: int, length: int, device: torch.device) -> int:
    """Sequence chunks for the forward: enough programs to keep every SM busy, tiles of TILE_L at least."""
    if FORCE_CHUNKS is not None:
        return max(1, min(FORCE_CHUNKS, triton.cdiv(length, TILE_L)))
    if device.type != "cuda":
        return 1
    programs_wanted = FWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    chunks = triton.cdiv(programs_wanted, batch * dim_blocks)
    return max(1, min(chunks, triton.cdiv(length, MIN_CHUNK_TILES * TILE_L)))


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, save_ckpt):
    """Run the forward kernels; returns out, final_state and (if save_ckpt) the tile checkpoints."""
    batch, dim, length = u.shape
    N = A.shape[1]
    B, C = _grouped(B), _grouped(C)
    A = A.contiguous()
    block_d = _block_d(dim, B, C, FWD_BLOCK_D)
    B, C = _steps_major(B), _steps_major(C)
    dim_blocks = triton.cdiv(dim, block_d)
    n_tiles = triton.cdiv(length, TILE_L)
    chunks = _num_chunks(batch, dim_blocks, length, u.device)
    chunk_len = triton.cdiv(n_tiles, chunks) * TILE_L
    chunks = triton.cdiv(length, chunk_len)
    dev = u.device
    out = torch.empty_like(u)  # u's layout: (batch, dim, L) or the layer's (L, batch * L, 1), steps adjacent
    hend = torch.empty(batch, chunks, dim, N, device=dev, dtype=torch.float32)
    ckpt = torch.empty(batch, dim, n_tiles, N, device=dev, dtype=torch.float32) if save_ckpt else hend
    h0 = None if initial_state is None else initial_state.float().contiguous().unsqueeze(1)
    seq = seq_idx if seq_idx is not None else u
    dummy = u
    wide = wide_offsets(u, delta, z, out, B, C, seq_idx, hend, ckpt)

    def launch(start, write_out, write_decay, decay):
        s_start = start.stride() if start is not None else (0, 0, 0, 0)
        _scan_fwd_kernel[(batch, dim_blocks, chunks)](
            u, delta, A, B, C, D if D is not None else dummy, z if z is not None else dummy,
            delta_bias if delta_bias is not None else dummy, seq, start if start is not None else dummy,
            out, hend, decay, ckpt,
            dim, length, chunk_len, dim // B.shape[1], dim // C.shape[1], 1,
            *u.stride(), *delta.stride(), *(z.stride() if z is not None else (0, 0, 0)), *out.stride(),
            *B.stride(), *C.stride(),
            *(seq_idx.stride() if seq_idx is not None else (0, 0)),
            s_start[0], s_start[1], s_start[2], hend.stride(0), hend.stride(1), hend.stride(2),
            ckpt.stride(0), ckpt.stride(1), ckpt.stride(2),
            N=N, N_P2=triton.next_power_of_2(N), BLOCK_D=block_d, BLOCK_L=TILE_L, UNROLL=FWD_UNROLL,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_SEQ_IDX=seq_idx is not None, HAS_H0=start is not None, WRITE_OUT=write_out,
            WRITE_DECAY=write_decay, WRITE_CKPT=write_out and save_ckpt, WIDE=wide,
            num_warps=FWD_WARPS,
        )

    if chunks == 1:
        launch(h0, True, False, hend)
    else:
        decay = torch.empty_like(hend)
        launch(None, False, True, decay)
        DN = dim * N
        block = 1024
        _chain_chunks_kernel[(batch, triton.cdiv(DN, block))](
            hend, decay, h0 if h0 is not None else hend, chunks, hend.stride(0), hend.stride(1), DN,
            HAS_H0=h0 is not None, BLOCK=block)
        launch(hend, True, False, hend)  # each program reads its chunk's start, then writes its end, in place
    final_state = hend[:, -1]
    return out, final_state, (ckpt if save_ckpt else None)


def _scan_backward(dout, dfinal, saved, delta_softplus, has_h0):
    u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt = saved
    batch, dim, length = u.shape
    N = A.shape[1]
    Bg, Cg = _grouped(B), _grouped(C)
    block_d = _block_d(dim, Bg, Cg, BWD_BLOCK_D)
    dout = dout.contiguous()
    dev = u.device
    du = torch.empty_like(dout, dtype=u.dtype)
    ddelta = torch.empty_like(dout, dtype=delta.dtype)
    dz = torch.empty_like(dout, dtype=z.dtype) if z is not None else None
    dB = torch.zeros(Bg.shape, device=dev, dtype=torch.float32)
    dC = torch.zeros(Cg.shape, device=dev, dtype=torch.float32)
    dA = torch.zeros(dim, N, device=dev, dtype=torch.float32)
    dD = torch.zeros(dim, device=dev, dtype=torch.float32) if D is not None else None
    dbias = torch.zeros(dim, device=dev, dtype=torch.float32) if delta_bias is not None else None
    dh0 = torch.empty(batch, dim, N, device=dev, dtype=torch.float32) if has_h0 else None
    dfinal = dfinal.float().contiguous() if dfinal is not None else None
    dummy = dA
    _scan_bwd_kernel[(batch, triton.cdiv(dim, block_d))](
        u, delta, A, Bg, Cg, D if D is not None else dummy, z if z is not None else dummy,
        delta_bias if delta_bias is not None else dummy, seq_idx if seq_idx is not None else dummy, ckpt,
        dout, dfinal if dfinal is not None else dummy,
        du, ddelta, dA, dB, dC, dD if dD is not None else dummy, dz if dz is not None else du,
        dbias if dbias is not None else dummy, dh0 if dh0 is not None else dummy,
        dim, length, triton.cdiv(length, TILE_L), dim // Bg.shape[1], dim // Cg.shape[1],
        *u.stride(), *delta.stride(), *(z.stride() if z is not None else (0, 0, 0)), *dout.stride(),
        *Bg.stride(), *Cg.stride(), *(seq_idx.stride() if seq_idx is not None else (0, 0)),
        ckpt.stride(0), ckpt.stride(1), ckpt.stride(2),
        dB.stride(0), dB.stride(1), dB.stride(2), dC.stride(0), dC.stride(1), dC.stride(2),
        N=N, N_P2=triton.next_power_of_2(N), BLOCK_D=block_d, BLOCK_L=TILE_L,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_SEQ_IDX=seq_idx is not None, HAS_DHEND=dfinal is not None, WRITE_DH0=has_h0,
        num_warps=BWD_WARPS, **({} if BWD_MAXNREG is None else {"maxnreg": BWD_MAXNREG}),
    )
    dB = dB.reshape(B.shape).to(B.dtype)
    dC = dC.reshape(C.shape).to(C.dtype)
    return du, ddelta, dA.to(A.dtype), dB, dC, dD, dz, dbias, dh0


# Registered as torch.library custom ops (forward, backward, autograd link) so that torch.compile sees
# one opaque node per call instead of breaking the graph at the Triton launches; eager calls take the
# same bodies through an autograd.Function (see custom_op_if_compiling).
def _scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
              delta_bias: Optional[Tensor], delta_softplus: bool, initial_state: Optional[Tensor],
              seq_idx: Optional[Tensor], save_ckpt: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(out, final_state, tile checkpoints or an empty tensor when save_ckpt is False)."""
    out, final_state, ckpt = _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                           seq_idx, save_ckpt)
    return out, final_state.clone(), ckpt if ckpt is not None else u.new_empty(0, dtype=torch.float32)


_scan_fwd_op = torch.library.custom_op("mambakit::selective_scan_fwd", _scan_fwd, mutates_args=())


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, save_ckpt):
    batch, dim, length = u.shape
    N = A.shape[1]
    ckpt_shape = (batch, dim, triton.cdiv(length, TILE_L), N) if save_ckpt else (0,)
    return (torch.empty_like(u), u.new_empty(batch, dim, N, dtype=torch.float32),
            u.new_empty(ckpt_shape, dtype=torch.float32))


def _scan_bwd(dout: Tensor, dfinal: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
              D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], seq_idx: Optional[Tensor],
              ckpt: Tensor, delta_softplus: bool, has_h0: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                       Tensor, Tensor, Tensor, Tensor]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); empty tensors for absent inputs."""
    grads = _scan_backward(dout, dfinal, (u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt), delta_softplus, has_h0)
    return tuple(g if g is not None else u.new_empty(0) for g in grads)


_scan_bwd_op = torch.library.custom_op("mambakit::selective_scan_bwd", _scan_bwd, mutates_args=())


@_scan_bwd_op.register_fake
def _(dout, dfinal, u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt, delta_softplus, has_h0):
    batch, dim, length = u.shape
    absent = lambda: u.new_empty(0)  # noqa: E731  (what the real op returns for an absent input)
    f32 = lambda *shape: u.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return (u.new_empty(u.shape), delta.new_empty(u.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), f32(dim) if D is not None else absent(),
            z.new_empty(u.shape) if z is not None else absent(), f32(dim) if delta_bias is not None else absent(),
            f32(batch, dim, A.shape[1]) if has_h0 else absent())


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, _ = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.has_h0 = initial_state is not None


def _scan_grads(ctx, dout, dfinal, _dckpt, backward=_scan_bwd_op):
    u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = backward(
        dout, dfinal, u, delta, A, B, C, D, z, delta_bias, seq_idx, ckpt, ctx.delta_softplus, ctx.has_h0)
    present = lambda grad, t: grad if t is not None else None  # noqa: E731
    return (du, ddelta, dA, dB, dC, present(dD, D), present(dz, z), present(dbias, delta_bias), None,
            dh0 if ctx.has_h0 else None, None, None)


_scan_fwd_op.register_autograd(_scan_grads, setup_context=_scan_setup_context)
_scan_fwd_eager = eager_autograd(_scan_fwd, _scan_setup_context, functools.partial(_scan_grads, backward=_scan_bwd))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, seq_idx=None):
    """Triton selective scan; arguments and shapes as `mambakit.ops.selective_scan` (validated there).

    fp64 inputs go to the reference (the kernels compute in fp32).
    """
    if any(t is not None and t.dtype == torch.float64 for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)):
        return reference.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                        delta_softplus=delta_softplus, initial_state=initial_state,
                                        return_final_state=return_final_state, seq_idx=seq_idx)
    D = D.contiguous() if D is not None else None  # the kernels index D and delta_bias with unit stride
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))
    # Steps adjacent in memory (delta = linear(...).transpose(1, 2) is not): each thread walks a run of steps
    # of its channel, so a copy costs less than strided loads in every pass, forward and backward. B and C
    # may instead have their states adjacent (cut from x_proj's output): the forward reads them per step.
    u, delta, z = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (u, delta, z))
    B, C = (t if t.stride(-1) == 1 or (not needs_grad and t.stride(-2) == 1) else t.contiguous() for t in (B, C))
    scan = custom_op_if_compiling(_scan_fwd_op, _scan_fwd_eager)
    out, final_state, _ = scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, seq_idx, needs_grad)
    return (out, final_state) if return_final_state else out
