"""The w4a8 / w4a8-6bit grid-aware search's fast paths against the plain definitions they replace:
the per-group error read from tables of decoded levels (:func:`w4a8._bracket_error`,
:func:`w4a8._window_error`) equals :func:`w4a8._grid_error` bit for bit for every e4m3 code on
adversarial targets (levels, midpoints and their neighbouring floats, out of range, zero), and the
whole quantizer, searched in row chunks, writes what the unchunked search over whole tensors writes."""

from __future__ import annotations

import pytest
import torch

from quantkit.formats import _lowbit as lb
from quantkit.formats import w4a8

CODES = torch.arange(w4a8.E4M3_MAX_BITS + 1, dtype=torch.int32)
S_REL = CODES.to(torch.uint8).view(torch.float8_e4m3fn).float()


def _table(bits):
    if bits == 6:
        return torch.arange(-w4a8.W6_LEVELS, w4a8.W6_LEVELS + 1, dtype=torch.float32)
    return torch.tensor(w4a8.LLOYD_MAX_16, dtype=torch.float32)


def _adversarial_targets(bits: int) -> torch.Tensor:
    """[127, T] targets for each code: its decoded levels, their midpoints, half-integers, each with
    the floats just below and above, then out-of-range, signed zeros and random values."""
    g = torch.Generator().manual_seed(7)
    table = _table(bits)
    rows = []
    for s in S_REL:
        lv = w4a8._grid(table, s.view(1))[0]
        mids = (lv[1:] + lv[:-1]) / 2
        base = torch.cat([lv, mids, lv + 0.5, lv - 0.5, (table * s), (table * s) / 2])
        near = torch.cat([base, torch.nextafter(base, base + 1), torch.nextafter(base, base - 1)])
        extra = torch.tensor([0.0, -0.0, 127.5, -127.5, 128.0, -128.0, 128.5, -129.5, 300.0, -1e6, 1e30, -1e30,
                              1e-30, -1e-30, 33 * float(s), -33 * float(s)])
        rnd = torch.randn(96, generator=g) * max(float(s), 1.0) * 40
        rows.append(torch.cat([near, extra, rnd]))
    t = max(r.numel() for r in rows)
    t = (t + 15) // 16 * 16
    return torch.stack([torch.cat([r, r[: t - r.numel()]]) for r in rows])


@pytest.mark.parametrize("bits", [4, 6])
def test_table_errors_equal_the_grid_error_for_every_code(bits):
    table = _table(bits)
    targets = _adversarial_targets(bits)
    per = targets.shape[1] // 16
    x = targets.reshape(-1, 16)
    raw = CODES.repeat_interleave(per)
    want = w4a8._grid_error(table, S_REL.repeat_interleave(per), x, bits)
    if bits == 4:
        cell = x.floor().clamp_(-w4a8.LUT_HALF, w4a8.LUT_HALF).to(torch.int64).add_(w4a8.LUT_HALF)
        got = w4a8._bracket_error(w4a8._bracket_lut(table), raw, cell, x)
    else:
        got = w4a8._window_error(w4a8._window_lut(), raw, x)
    assert want.isfinite().any() and want.gt(0).any()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), int((got != want).sum())


def _reference_fit(x, table, rows):
    """The search as first written (whole tensor at once, :func:`w4a8._grid_error` per candidate)."""
    bits = 6 if table.numel() == 2 * w4a8.W6_LEVELS + 1 else 4
    gs, idx = w4a8._als(x, table, bits, w4a8.ALS_ITERS)
    s_channel0 = ((table[idx] * gs).abs().reshape(rows, -1).amax(dim=1) / 127.0).clamp(min=1e-8)
    per = x.shape[0] // rows
    steps = [0] + [d for s in range(1, w4a8.SEARCH_STEPS + 1) for d in (-s, s)]
    best = None
    for f in w4a8.CHANNEL_FACTORS:
        s_channel = s_channel0 if f == 1.0 else s_channel0 * f
        sc = s_channel.repeat_interleave(per).unsqueeze(1)
        raw = (gs / sc).clamp_(max=448.0).reshape(-1).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
        target = x / sc
        g_best = None
        for d in steps:
            cand = (raw + d).clamp(0, w4a8.E4M3_MAX_BITS) if d else raw
            err = w4a8._grid_error(table, cand.to(torch.uint8).view(torch.float8_e4m3fn).float(), target, bits)
            if g_best is None:
                g_best = [cand, err]
                continue
            take = err < g_best[1]
            g_best = [torch.where(take, cand, g_best[0]), torch.where(take, err, g_best[1])]
        row_err = lb.tree_sum(g_best[1].double().reshape(rows, per)) * s_channel.double().square()
        if best is None:
            best = [s_channel, g_best[0], row_err]
            continue
        take = row_err < best[2]
        best = [torch.where(take, s_channel, best[0]), torch.where(take.repeat_interleave(per), g_best[0], best[1]),
                torch.where(take, row_err, best[2])]
    s_channel, raw, _ = best
    s_rel = raw.to(torch.uint8).view(torch.float8_e4m3fn)
    sc = s_channel.repeat_interleave(per).unsqueeze(1)
    return s_rel, s_channel, w4a8._nearest(x / sc, w4a8._grid(table, s_rel.float()))


def _weights():
    g = torch.Generator().manual_seed(3)
    yield torch.randn(37, 256, generator=g) / 16
    yield torch.randn(24, 512, generator=g) ** 3  # heavy tails: clamped and coinciding levels
    yield torch.randint(-3, 4, (20, 128), generator=g).float() * 0.01  # repeated values, exact ties
    w = torch.zeros(18, 256)
    w[::3, ::5] = 1.0
    w[1] = 1e-30  # tiny row: s_channel and s_rel at their floors
    yield w


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("chunk", [1, 1 << 12, 1 << 30])  # a row a chunk, a few rows, all at once
def test_chunked_search_writes_the_reference_search(monkeypatch, bits, chunk):
    monkeypatch.setattr(w4a8, "CHUNK_ELEMS", chunk)
    table = _table(bits)
    for w in _weights():
        n, k = w.shape
        x = w.reshape(-1, w4a8.GROUP)
        want = _reference_fit(x, table, n)
        got = w4a8._fit(x, table, n)
        for a, b in zip(got, want):
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def test_nearest_decoded_is_the_nearest_search_for_every_code():
    """The final codes: index for index (a tie to the lower index, repeated clamped levels)."""
    table = _table(4)
    targets = _adversarial_targets(4)
    per = targets.shape[1] // 16
    x = targets.reshape(-1, 16)
    raw = CODES.repeat_interleave(per)
    want = w4a8._nearest(x, w4a8._grid(table, S_REL.repeat_interleave(per)))
    got = w4a8._nearest_decoded(table, raw, x)
    assert want.unique().numel() == 16
    assert torch.equal(got, want), int((got != want).sum())
