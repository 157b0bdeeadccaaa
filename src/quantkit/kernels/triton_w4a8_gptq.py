"""Triton kernel for one column block of learned rounding on the ``w4a8`` / ``w4a8-6bit`` grid
(:class:`quantkit.formats.w4a8.W4A8Grid` under :func:`quantkit.learned.gptq_grid`).

As in :mod:`quantkit.kernels.triton_gptq`, every row is rounded independently under the same upper
Cholesky factor U, so one program keeps a tile of rows x up to ``COLS`` columns in registers and runs
the block's whole column loop on it. Here the loop also chooses each group's scale: at a group's
first column, every e4m3 code within ``STEPS`` of the quantizer's ``s_rel`` is scored by the squared
error of the group's error-updated columns at their nearest decoded INT8 level (the grid's
``choose``), and the first best is kept; each column is then rounded to the nearest decoded level of
its group (the grid's ``round``), its error divided by U[j, j] and fed to the columns right of it.

The arithmetic is the PyTorch loop's, operation for operation: IEEE divisions (``div_rn``), products
and differences each rounded once (the kernel is compiled with ``enable_fp_fusion=False``, so no
multiply-add is contracted), round half to even by the 1.5 * 2^23 trick, the 16-wide error sums in
:func:`quantkit.formats._lowbit.tree_sum`'s order, nearest-level ties to the lower level. Given the
same weights and factor it writes the loop's codes and scales exactly (tested bit for bit under
``TRITON_INTERPRET=1``); the trailing update right of the block stays one GEMM in
:func:`quantkit.learned.gptq_grid`, on either path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_quant import _RNE_MAGIC

ROWS = 16  # rows per program
COLS = 128  # columns per block (quantkit.learned.COLUMN_BLOCK)
GROUP = 16  # weights per s_rel group (quantkit.formats.w4a8.GROUP)
_E4M3_MAX = tl.constexpr(0x7E)  # the largest finite e4m3fn code


@triton.jit
def _e4m3(code):
    """e4m3fn code (int32, 0..0x7E) -> its value, exactly."""
    e = code >> 3
    m = code & 7
    sub = m.to(tl.float32) * 0.001953125  # m * 2^-9
    p2 = ((e + 117) << 23).to(tl.float32, bitcast=True)  # 2^(e - 10)
    return tl.where(e == 0, sub, (m + 8).to(tl.float32) * p2)


@triton.jit
def _rne(x):
    """Round half to even; exact for |x| < 2^22 (larger values are clamped first by the callers)."""
    return (x + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def _levels(tab, lmask, sv):
    """Decoded INT8 levels clamp(round(level * s_rel), -127, 127) of each row's s_rel ``sv`` [R] ->
    [R, L]; padding entries +inf (never below a value, never picked)."""
    v = _rne(tab[None, :] * sv[:, None])
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    return tl.where(lmask[None, :], v, float("inf"))


@triton.jit
def _tree16(x, R: tl.constexpr):
    """[R, 16] -> [R]: _lowbit.tree_sum's order (halves added pairwise)."""
    x = tl.sum(tl.reshape(x, (R, 2, 8)), axis=1)
    x = tl.sum(tl.reshape(x, (R, 2, 4)), axis=1)
    x = tl.sum(tl.reshape(x, (R, 2, 2)), axis=1)
    return tl.sum(x, axis=1)


@triton.jit
def _group_error(target, code, tab, lmask, NL: tl.constexpr, L: tl.constexpr, SIX: tl.constexpr,
                 R: tl.constexpr):
    """w4a8._grid_error: per row, the squared error of the group's targets [R, 16] at their nearest
    decoded level under the e4m3 code ``code`` [R]."""
    sv = _e4m3(code)
    if SIX:
        sden = tl.where(sv > 0, sv, 1.0)
        y = tl.math.div_rn(target, sden[:, None])
        l0 = _rne(tl.minimum(tl.maximum(y, -4194304.0), 4194304.0))
        best = tl.full(target.shape, float("inf"), tl.float32)
        for dd in tl.static_range(3):
            lv = tl.minimum(tl.maximum(l0 + (dd - 1), -31.0), 31.0)
            v = tl.minimum(tl.maximum(_rne(lv * sv[:, None]), -127.0), 127.0)
            e = (v - target) * (v - target)
            best = tl.minimum(best, e)
        return _tree16(best, R)
    else:
        lev = _levels(tab, lmask, sv)  # [R, L]
        lidx = tl.arange(0, L)
        pos = tl.sum((lev[:, None, :] < target[:, :, None]).to(tl.int32), axis=2)  # [R, 16]
        lo = tl.maximum(pos - 1, 0)
        hi = tl.minimum(pos, NL - 1)
        vlo = tl.sum(tl.where(lidx[None, None, :] == lo[:, :, None], lev[:, None, :], 0.0), axis=2)
        vhi = tl.sum(tl.where(lidx[None, None, :] == hi[:, :, None], lev[:, None, :], 0.0), axis=2)
        pick = tl.where(tl.abs(target - vhi) < tl.abs(target - vlo), vhi, vlo)
        d = pick - target
        return _tree16(d * d, R)


@triton.jit
def _w4a8_block(w_ptr, u_ptr, sch_ptr, raw_ptr, tab_ptr, codes_ptr, srel_ptr, e_ptr, n, k, i1, width,
                NL: tl.constexpr, L: tl.constexpr, SIX: tl.constexpr, STEPS: tl.constexpr,
                ROWS: tl.constexpr, COLS: tl.constexpr):
    """w [n, k] fp32 (rotated, error-updated), u [k, k] fp32, sch [n] fp32, raw [n, k/16] int32 (the
    quantizer's s_rel codes), tab [NL] fp32 (levels); writes codes [n, k] int32 and srel [n, k/16]
    int32 for columns i1 .. i1+width-1 (a multiple of 16) and the scaled errors e [n, COLS]."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < n
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, COLS)
    cmask = cols < width
    tile = tl.load(w_ptr + r64[:, None] * k + i1 + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    sch = tl.load(sch_ptr + rows, mask=rmask, other=1.0)
    lidx = tl.arange(0, L)
    lmask = lidx < NL
    tab = tl.load(tab_ptr + lidx, mask=lmask, other=0.0)
    ng = k // 16
    gsel = tl.arange(0, COLS // 16)
    ubase = u_ptr + i1 * k + i1
    ebase = e_ptr + r64 * COLS
    cbase = codes_ptr + r64 * k + i1
    for g in range(width // 16):
        gi = i1 // 16 + g
        t3 = tl.reshape(tile, (ROWS, COLS // 16, 16))
        gcols = tl.sum(tl.where((gsel == g)[None, :, None], t3, 0.0), axis=1)  # [ROWS, 16]
        target = tl.math.div_rn(gcols, sch[:, None])
        raw0 = tl.load(raw_ptr + r64 * ng + gi, mask=rmask, other=0)
        best = raw0
        best_err = _group_error(target, raw0, tab, lmask, NL, L, SIX, ROWS)
        for dd in tl.static_range(1, 2 * STEPS + 1):
            step = (dd + 1) // 2 - (dd % 2) * 2 * ((dd + 1) // 2)  # -1, 1, -2, 2, ...
            cand = tl.minimum(tl.maximum(raw0 + step, 0), _E4M3_MAX)
            err = _group_error(target, cand, tab, lmask, NL, L, SIX, ROWS)
            take = err < best_err  # the first best: the quantizer's own s_rel wins ties
            best = tl.where(take, cand, best)
            best_err = tl.where(take, err, best_err)
        tl.store(srel_ptr + r64 * ng + gi, best, mask=rmask)
        lev = _levels(tab, lmask, _e4m3(best))  # [ROWS, L], sorted (table sorted, s_rel >= 0)
        for c in range(16):
            j = g * 16 + c
            col = tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)
            v = tl.math.div_rn(col, sch)
            pos = tl.sum((lev < v[:, None]).to(tl.int32), axis=1)
            lo = tl.maximum(pos - 1, 0)
            hi = tl.minimum(pos, NL - 1)
            vlo = tl.sum(tl.where(lidx[None, :] == lo[:, None], lev, 0.0), axis=1)
            vhi = tl.sum(tl.where(lidx[None, :] == hi[:, None], lev, 0.0), axis=1)
            up = tl.abs(v - vhi) < tl.abs(v - vlo)
            q = tl.where(up, vhi, vlo) * sch
            code = tl.where(up, hi, lo)
            if SIX:
                code = code + 1
            d = tl.load(ubase + j * k + j)
            err = tl.math.div_rn(col - q, d)
            urow = tl.load(ubase + j * k + cols, mask=cmask & (cols >= j), other=0.0)
            tile = tile - err[:, None] * urow[None, :]
            tl.store(cbase + j, code, mask=rmask)
            tl.store(ebase + j, err, mask=rmask)



def w4a8_block(w: torch.Tensor, u: torch.Tensor, s_ch: torch.Tensor, raw: torch.Tensor, table: torch.Tensor,
               codes: torch.Tensor, s_rel: torch.Tensor, err: torch.Tensor, i1: int, i2: int, steps: int,
               six: bool, rows: int = ROWS, num_warps: int = 4) -> None:
    """In place: codes[:, i1:i2], s_rel[:, i1/16:i2/16] (e4m3 codes, int32) and err[:, :i2-i1] for one
    column block. w [N, K], u [K, K], s_ch [N], table [L] fp32; raw [N, K/16] int32; err [N, COLS]."""
    n, k = w.shape
    width = i2 - i1
    assert 0 < width <= COLS and width % GROUP == 0 and i1 % GROUP == 0 and err.shape == (n, COLS)
    for t in (w, u, s_ch, table, err):
        assert t.dtype == torch.float32 and t.is_contiguous()
    for t in (raw, codes, s_rel):
        assert t.dtype == torch.int32 and t.is_contiguous()
    nl = table.numel()
    _w4a8_block[(triton.cdiv(n, rows),)](
        w, u, s_ch, raw, table, codes, s_rel, err, n, k, i1, width, NL=nl, L=triton.next_power_of_2(nl),
        SIX=six, STEPS=steps, ROWS=rows, COLS=COLS, num_warps=num_warps, enable_fp_fusion=False)
