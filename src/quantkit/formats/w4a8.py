"""``w4a8`` and ``w4a8-6bit``: grouped 4-bit Lloyd-Max codebook codes (or uniform 6-bit codes) of W
rotated by ConvRot, decoded onto an INT8 grid; stock ComfyUI's ``asym_w4a8_int8`` (comfy-kitchen
``AsymW4A8Int8Layout``; the bit depth is implied by the packed row width).

On disk, for a weight [N, K], group size g = 16 and ConvRot group G:

* ``weight``: I8 [N, K/2] (4-bit: two codes a byte, even column in the low nibble) or [N, 3K/4]
  (6-bit: that nibble plane, then a K/4-byte plane of each code's top two bits, column c in byte
  c // 4 at bit 2 (c % 4); codes are level + 32)
* ``weight_s_rel``: F8_E4M3 [N, K/g] (per-group scale relative to the row's)
* ``weight_s_channel``: F32 [N]
* ``weight_codebook``: F32 [16] (4-bit only; 6-bit levels are the integers -31..31)
* ``.comfy_quant``: ``{"format": "asym_w4a8_int8", "group_size": 16, "convrot_groupsize": G, ...}``;
  G is per layer (the largest of 256 / 64 / 16 dividing K: a K = 384 layer gets 64).

Dequantization (kitchen's eager path, bit for bit, compute dtype D): ``i8 = clamp(round(level[c] *
float(s_rel)), -127, 127)``; ``R = (i8.float() * s_channel[:, None]).to(D)``; then ``R`` viewed
[N, K/G, G] ``torch.matmul`` H^T, H built in D (kitchen rotates in the compute dtype).

Quantization (the spec), all fp32, sums by :func:`_lowbit.tree_sum`:

1. R = W rotated by the butterfly (:func:`hadamard.rotate`), viewed as groups x of 16;
2. per group, alternating least squares from ``amax`` (4-bit) or ``amax / 31`` (6-bit), as kitchen:
   codes = nearest level of x / gs, then ``gs = <x, l> / <l, l>``, :data:`ALS_ITERS` times;
3. ``s_channel = max |l gs| over the row / 127``, ``s_rel = e4m3(gs / s_channel)`` (kitchen stops here
   at 4 bits, and at 6 bits searches s_rel over +-1 e4m3 step);
4. grid-aware search: per row, s_channel times each f in :data:`CHANNEL_FACTORS` (1 first; one e4m3
   step swept in 8ths), and per group every e4m3 value within :data:`SEARCH_STEPS` of ``s_rel``;
   a group's error is summed through the decoded INT8 levels (``clamp(round(l s_rel))``), a row keeps
   its best f and each group its best s_rel (the first best: kitchen's choice wins ties); the codes
   are then the nearest decoded level of x / s_channel (a tie to the lower level, as kitchen).

The 4-bit table is kitchen's frozen Lloyd-Max one: refitting it per layer (Lloyd iterations on the
group-normalised rotated weights) measured +0.008 dB mean on 12 all-MiniLM-L6-v2 layers and would lose
kitchen's CUDA GEMV packing, which takes only layers carrying that table.
"""

from __future__ import annotations

from . import _lowbit as lb
from .base import Format, LayerOpts, Stored, Violation, dtype_str, register, shape_reason

GROUP = 16
ALS_ITERS = 3
KITCHEN_ALS = 2  # kitchen's passes (search=False reproduces its quantizer)
SEARCH_STEPS = 3
# s_channel = max |l gs| / 127 times f: one e4m3 step (12.5%) swept in 8ths, and one 8th below 1
CHANNEL_FACTORS = tuple(1.0 + 0.125 * i / 8 for i in (0, -1, *range(1, 8)))
W6_LEVELS = 31
E4M3_MAX_BITS = 0x7E  # 0x7F is NaN in e4m3fn
LUT_HALF = 128  # decoded levels are integers in [-127, 127]: floor(target) clamped to +-128 finds them
CHUNK_ELEMS = 1 << 17  # the search runs over this many weights at a time (whole rows), to stay in cache
CUDA_CHUNK_ELEMS = 1 << 24  # on a GPU: few large launches (1 << 17 cuts a 3072^2 weight into 72 chunks x 63 candidate passes)
# kitchen's frozen table (comfy_kitchen.tensor.w4a8_packed._FIXED_LUT; a fact, the values it decodes)
LLOYD_MAX_16 = (-0.980602, -0.794529, -0.638165, -0.500986, -0.377321, -0.263187, -0.155210, -0.050720,
                0.052541, 0.156985, 0.265284, 0.379533, 0.502636, 0.638953, 0.794876, 0.980671)


def _nearest(values, table):
    """Index of the nearest entry of the sorted 1-D ``table`` (or per-row tables [R, L]) to each
    value; a tie goes to the lower index."""
    import torch
    last = table.shape[-1] - 1
    pos = torch.searchsorted(table, values.contiguous())
    lo, hi = (pos - 1).clamp_(0, last), pos.clamp_(0, last)
    if table.dim() == 1:
        tl, th = table[lo], table[hi]
    else:
        tl, th = torch.gather(table, 1, lo), torch.gather(table, 1, hi)
    return torch.where((values - th).abs() < (values - tl).abs(), hi, lo)


def _als(x, table, bits, iters: int = ALS_ITERS):
    """(gs [R, 1], level indices [R, g]) by alternating least squares (step 2)."""
    import torch
    from ._common import div
    amax = x.abs().amax(dim=1, keepdim=True)
    gs = (div(amax, W6_LEVELS) if bits == 6 else amax).clamp(min=1e-8)

    def assign(y):
        if bits == 6:
            return (y.round().clamp_(-W6_LEVELS, W6_LEVELS) + W6_LEVELS).to(torch.int64)
        return _nearest(y, table)

    idx = assign(x / gs)
    for _ in range(iters):
        lv = table[idx]
        gs = (lb.tree_sum(x * lv) / lb.tree_sum(lv * lv).clamp(min=1e-8)).clamp(min=1e-8).unsqueeze(1)
        idx = assign(x / gs)
    return gs, idx


def _grid(table, s_rel):
    """The INT8 values each level decodes to in every group: clamp(round(level * s_rel), -127, 127)."""
    return (table.view(1, -1) * s_rel.view(-1, 1)).round_().clamp_(-127, 127)


def _fit(x, table, rows: int, search: bool = True):
    """Steps 2-4 for one level table: (s_rel e4m3 [R], s_channel [N], indices [R, g])."""
    import torch
    from ._common import div
    bits = 6 if table.numel() == 2 * W6_LEVELS + 1 else 4
    gs, idx = _als(x, table, bits, ALS_ITERS if search else KITCHEN_ALS)
    shifted = (table[idx] * gs).abs().reshape(rows, -1)
    s_channel0 = div(shifted.amax(dim=1), 127.0).clamp(min=1e-8)
    per = x.shape[0] // rows
    steps = [0] + [d for s in range(1, SEARCH_STEPS + 1) for d in (-s, s)] if search else [0]
    factors = CHANNEL_FACTORS if search else (1.0,)
    lut = _bracket_lut(table) if bits == 4 else _window_lut(x.device)
    s_ch_out = torch.empty_like(s_channel0)
    raw_out = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    chunk = CHUNK_ELEMS if x.device.type == "cpu" else CUDA_CHUNK_ELEMS
    step = max(1, chunk // (per * GROUP))  # rows a chunk: every decision is per group or per row
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        g0, g1 = r0 * per, r1 * per
        s_ch, raw = _search_rows(x[g0:g1], gs[g0:g1], s_channel0[r0:r1], table, bits, per, steps, factors, lut)
        s_ch_out[r0:r1], raw_out[g0:g1] = s_ch, raw
    s_channel, raw = s_ch_out, raw_out
    s_rel = raw.to(torch.uint8).view(torch.float8_e4m3fn)
    sc = s_channel.repeat_interleave(per).unsqueeze(1)
    if bits == 4:
        return s_rel, s_channel, _nearest_decoded(table, raw, x / sc)
    return s_rel, s_channel, _nearest(x / sc, _grid(table, s_rel.float()))


def _search_rows(x, gs, s_channel0, table, bits: int, per: int, steps, factors, lut):
    """Step 4 on a run of whole rows: (s_channel [rows], raw e4m3 s_rel codes int32 [groups])."""
    import torch
    rows = s_channel0.shape[0]
    best = None  # per row: s_channel, per group: raw s_rel; row error
    for f in factors:
        s_channel = s_channel0 if f == 1.0 else s_channel0 * f
        sc = s_channel.repeat_interleave(per).unsqueeze(1)  # [R, 1]
        raw = (gs / sc).clamp_(max=448.0).reshape(-1).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
        target = x / sc
        cell = target.floor().clamp_(-LUT_HALF, LUT_HALF).to(torch.int64).add_(LUT_HALF) if bits == 4 else None
        g_best = None
        for d in steps:
            cand_raw = (raw + d).clamp(0, E4M3_MAX_BITS) if d else raw
            if bits == 6:
                err = _window_error(lut, cand_raw, target)
            else:
                err = _bracket_error(lut, cand_raw, cell, target)
            if g_best is None:
                g_best = [cand_raw, err]
                continue
            take = err < g_best[1]
            g_best = [torch.where(take, cand_raw, g_best[0]), torch.where(take, err, g_best[1])]
        row_err = lb.tree_sum(g_best[1].double().reshape(rows, per)) * s_channel.double().square()
        if best is None:
            best = [s_channel, g_best[0], row_err]
            continue
        take = row_err < best[2]
        best = [torch.where(take, s_channel, best[0]), torch.where(take.repeat_interleave(per), g_best[0], best[1]),
                torch.where(take, row_err, best[2])]
    return best[0], best[1]


def _bracket_lut(table):
    """For every e4m3 code r (0..0x7E) and integer m in [-LUT_HALF, LUT_HALF]: (the largest decoded
    level <= m, else the smallest; the smallest decoded level > m, else the largest), flattened
    [r * (2 LUT_HALF + 1) + m + LUT_HALF]. The decoded levels are integers in [-127, 127] and sorted
    (table sorted, s_rel >= 0; multiply, round and clamp keep order), so for a target t with
    m = floor(t) (clamped: beyond the range every level lies on one side) these are the decoded
    levels just below and just above t, the only candidates for its nearest."""
    import torch
    vals = torch.arange(E4M3_MAX_BITS + 1, dtype=torch.uint8, device=table.device).view(torch.float8_e4m3fn).float()
    levels = _grid(table, vals)  # [127, L], the same arithmetic as each group's grid
    m = torch.arange(-LUT_HALF, LUT_HALF + 1, dtype=torch.float32, device=table.device).view(1, -1, 1)
    lv = levels.unsqueeze(1)
    le = lv <= m
    below = torch.where(le, lv, torch.full_like(lv, -float("inf"))).amax(dim=-1)
    below = torch.where(le.any(dim=-1), below, levels[:, :1])
    gt = lv > m
    above = torch.where(gt, lv, torch.full_like(lv, float("inf"))).amin(dim=-1)
    above = torch.where(gt.any(dim=-1), above, levels[:, -1:])
    return below.reshape(-1).contiguous(), above.reshape(-1).contiguous()


def _bracket_error(lut, raw, cell, target):
    """:func:`_grid_error` at 4 bits, value for value: the squared error at the nearest decoded level
    is the smaller of those at the levels just below and just above the target (fp32 subtraction is
    monotone), which is what the nearest search over the sorted levels picks."""
    import torch
    idx = cell + (raw.to(torch.int64) * (2 * LUT_HALF + 1)).unsqueeze(1)
    below, above = lut
    eb = (below.take(idx) - target).square_()
    ea = (above.take(idx) - target).square_()
    return lb.tree_sum(torch.minimum(eb, ea, out=eb))


def _window_lut(device=None):
    """At 6 bits, for every e4m3 code r and l0 in [-W6_LEVELS - 1, W6_LEVELS + 1]: the decoded level
    ``clamp(round(clamp(l0 + d, -31, 31) * s_rel), -127, 127)`` for d = -1, 0, 1, three tables
    flattened [r * (2 W6_LEVELS + 3) + l0 + W6_LEVELS + 1] (an l0 beyond +-32 gives the same levels
    as +-32)."""
    import torch
    vals = torch.arange(E4M3_MAX_BITS + 1, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).float()
    lv = torch.arange(-W6_LEVELS - 2, W6_LEVELS + 3, dtype=torch.float32, device=device).clamp_(-W6_LEVELS, W6_LEVELS)
    v = (lv.view(1, -1) * vals.view(-1, 1)).round_().clamp_(-127, 127)  # [127, 67], l = -33..33
    width = 2 * W6_LEVELS + 3
    return vals, tuple(v[:, 1 + d: 1 + d + width].reshape(-1).contiguous() for d in (-1, 0, 1))


def _window_error(lut, raw, target):
    """:func:`_grid_error` at 6 bits, value for value, its decoded levels read from :func:`_window_lut`."""
    import torch
    vals, tabs = lut
    raw = raw.to(torch.int64)
    s = vals.take(raw).unsqueeze(1)
    l0 = (target / torch.where(s > 0, s, torch.ones_like(s))).round_().clamp_(-W6_LEVELS - 1, W6_LEVELS + 1)
    idx = l0.to(torch.int64).add_((raw * (2 * W6_LEVELS + 3) + W6_LEVELS + 1).unsqueeze(1))
    best = None
    for tab in tabs:
        e = (tab.take(idx) - target).square_()
        best = e if best is None else torch.minimum(best, e, out=best)
    return lb.tree_sum(best)


def _nearest_decoded(table, raw, t):
    """``_nearest(t, _grid(table, s_rel))`` for groups of e4m3 codes ``raw`` [R], index for index:
    :func:`_nearest` compares the last level < t with the first level >= t (clamped to the table's
    ends), which are the last level <= m and the first level > m for the integer m = ceil(t) - 1
    (decoded levels are sorted integers), read from per-code tables."""
    import torch
    vals = torch.arange(E4M3_MAX_BITS + 1, dtype=torch.uint8, device=t.device).view(torch.float8_e4m3fn).float()
    levels = _grid(table, vals)  # [127, L]
    last = levels.shape[1] - 1
    m = torch.arange(-LUT_HALF, LUT_HALF + 1, dtype=torch.float32, device=t.device).view(1, -1, 1)
    le = (levels.unsqueeze(1) <= m).sum(dim=-1)  # levels <= m: the last such is le - 1, the first > m is le
    lo_tab = (le - 1).clamp_(0, last).reshape(-1)
    hi_tab = le.clamp_(0, last).reshape(-1)
    raw = raw.to(torch.int64)
    cell = t.ceil().sub_(1).clamp_(-LUT_HALF, LUT_HALF).to(torch.int64)
    cell.add_((raw * (2 * LUT_HALF + 1) + LUT_HALF).unsqueeze(1))
    lo, hi = lo_tab.take(cell), hi_tab.take(cell)
    base = (raw * (last + 1)).unsqueeze(1)
    flat = levels.reshape(-1)
    tl, th = flat.take(lo + base), flat.take(hi + base)
    return torch.where((t - th).abs() < (t - tl).abs(), hi, lo)


def _grid_error(table, s_rel, target, bits: int):
    """Per group, the squared error of ``target`` [R, g] at its nearest decoded INT8 level. At 6
    bits the levels are round(l s) for integer l, so the nearest is one of round(t / s) + -1, 0, 1
    (a search score; the stored codes come from :func:`_nearest` over every level)."""
    import torch
    if bits == 4:
        levels = _grid(table, s_rel)
        return lb.tree_sum((torch.gather(levels, 1, _nearest(target, levels)) - target).square_())
    s = s_rel.unsqueeze(1)
    l0 = (target / torch.where(s > 0, s, torch.ones_like(s))).round_()
    best = None
    for d in (-1.0, 0.0, 1.0):
        v = ((l0 + d).clamp_(-W6_LEVELS, W6_LEVELS) * s).round_().clamp_(-127, 127)
        e = (v - target).square_()
        best = e if best is None else torch.minimum(best, e)
    return lb.tree_sum(best)


def quantize_rotated(r, bits: int, search: bool = True):
    """Stored tensors (codes int32 [N, K] as written: 4-bit indices / 6-bit level + 32, s_rel, s_channel,
    codebook or None) of rotated fp32 ``r``; ``search=False``: kitchen's quantizer (steps 2-3 with
    its passes, no search)."""
    import torch
    n, k = r.shape
    x = r.reshape(n * (k // GROUP), GROUP)
    if bits == 6:
        table = torch.arange(-W6_LEVELS, W6_LEVELS + 1, dtype=torch.float32, device=r.device)
    else:
        table = torch.tensor(LLOYD_MAX_16, dtype=torch.float32, device=r.device)
    s_rel, s_ch, idx = _fit(x, table, n, search)
    codes = (idx + 1 if bits == 6 else idx).to(torch.int32).reshape(n, k)
    return codes, s_rel.reshape(n, -1), s_ch, (table if bits == 4 else None)


def pack_codes(codes, bits: int):
    import torch
    low = lb.pack_nibbles(codes)
    if bits == 4:
        return low
    hi = (codes[:, 0::4] >> 4) & 0x3
    for j in range(1, 4):
        hi = hi | (((codes[:, j::4] >> 4) & 0x3) << (2 * j))
    return torch.cat([low, hi.to(torch.uint8).view(torch.int8)], dim=1).contiguous()


def unpack_codes(q, k: int, bits: int):
    import torch
    codes = lb.unpack_nibbles(q[:, : k // 2].contiguous())
    if bits == 6:
        hi = q[:, k // 2:].view(torch.uint8).to(torch.int32)
        for j in range(4):
            codes[:, j::4] |= ((hi >> (2 * j)) & 0x3) << 4
    return codes


def bits_of(marker: dict, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """4 or 6 from the packed row width against K = s_rel columns x group_size; None if neither."""
    w, s, g = shapes.get("weight"), shapes.get("weight_s_rel"), marker.get("group_size", GROUP)
    if not (w and s and len(w) == 2 and len(s) == 2 and isinstance(g, int) and g > 0):
        return None
    k = s[1] * g
    return 4 if k * 4 == w[1] * 8 else 6 if k * 6 == w[1] * 8 else None


class W4A8Format(Format):
    comfy_format = "asym_w4a8_int8"
    stock_comfy = True
    runtime_layout = "AsymW4A8Int8Layout"
    weight_dtype_name = "I8"
    optional_suffixes = ("weight_codebook",)  # ComfyUI loads a 4-bit layer without one (uniform codes)

    def __init__(self, name: str, bits: int, summary: str) -> None:
        self.name, self.bits, self.summary = name, bits, summary

    def cannot_take(self, shape: tuple[int, ...], opts: LayerOpts) -> str | None:
        reason = shape_reason(shape)
        if reason:
            return reason
        m = 32 if self.bits == 6 else GROUP
        if shape[1] % m:
            return f"in_features {shape[1]} is not a multiple of {m}"
        return None

    def stored(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> list[Stored]:
        n, k = shape
        out = [Stored("weight", "I8", (n, k * self.bits // 8)), Stored("weight_s_rel", "F8_E4M3", (n, k // GROUP)),
               Stored("weight_s_channel", "F32", (n,))]
        return out + ([Stored("weight_codebook", "F32", (16,))] if self.bits == 4 else [])

    def marker(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> dict:
        return {"format": self.comfy_format, "group_size": GROUP, "convrot_groupsize": lb.convrot_group(shape[1]),
                "orig_dtype": dtype_str(orig_dtype), "orig_shape": list(shape)}

    def describe(self) -> tuple[str, str]:
        if self.bits == 4:
            return "I8 [N,K/2] (4-bit codebook x2, ConvRot)", "fp8 [N,K/16], fp32 [N], codebook fp32 [16]"
        return "I8 [N,3K/4] (6-bit, ConvRot)", "fp8 [N,K/16], fp32 [N]"

    def recognizes(self, marker: dict, shapes: dict[str, tuple[int, ...]]) -> bool:
        return marker.get("format") == self.comfy_format and bits_of(marker, shapes) == self.bits

    def orig_shape(self, marker: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        return (shapes["weight"][0], shapes["weight_s_rel"][1] * marker.get("group_size", GROUP))

    def quantize(self, w, opts: LayerOpts, layer: str = "", search: bool = True) -> dict:
        from quantkit.formats_next import hadamard
        wf = lb.as_fp32(w, self.name, layer)
        reason = self.cannot_take(tuple(wf.shape), opts)
        if reason:
            raise lb.bad(layer, "weight", self.name, reason)
        r = hadamard.rotate(wf, lb.convrot_group(wf.shape[1]))
        codes, s_rel, s_ch, cb = quantize_rotated(r, self.bits, search)
        out = {"weight": pack_codes(codes, self.bits), "weight_s_rel": s_rel.contiguous(),
               "weight_s_channel": s_ch.contiguous()}
        if cb is not None:
            out["weight_codebook"] = cb
        return out

    def learn_grid(self, w, h, opts: LayerOpts, rtn: dict | None = None):
        return W4A8Grid(w, h, self.bits, rtn)

    def dequantize(self, tensors: dict, marker: dict, dtype, layer: str = ""):
        import torch
        from quantkit.formats_next import hadamard
        q, s_rel, s_ch = tensors["weight"], tensors.get("weight_s_rel"), tensors.get("weight_s_channel")
        cb = tensors.get("weight_codebook")
        g = lb.marker_int(marker, "group_size", GROUP, self.name, layer)
        G = lb.marker_int(marker, "convrot_groupsize", lb.DEFAULT_CONVROT, self.name, layer)
        if s_rel is None or s_ch is None:
            raise lb.bad(layer, "weight_s_rel" if s_rel is None else "weight_s_channel", self.name, "missing")
        if s_rel.dtype == torch.uint8:
            s_rel = s_rel.view(torch.float8_e4m3fn)
        if q.dtype != torch.int8 or q.dim() != 2 or s_rel.dim() != 2 or s_rel.shape[0] != q.shape[0]:
            raise lb.bad(layer, "weight", self.name, f"weight {q.dtype} {list(q.shape)} / s_rel {list(s_rel.shape)} "
                         "are not I8 [N, K*bits/8] / [N, K/group_size]")
        n, k = q.shape[0], s_rel.shape[1] * g
        bits = bits_of(marker, {"weight": tuple(q.shape), "weight_s_rel": tuple(s_rel.shape)})
        if bits is None:
            raise lb.bad(layer, "weight", self.name, f"row width {q.shape[1]} is neither K/2 nor 3K/4 for K={k}")
        if not hadamard.is_power_of_4(G) or k % G or k % 16:
            raise lb.bad(layer, "comfy_quant", self.name, f"convrot_groupsize {G} does not divide K={k}")
        if tuple(s_ch.shape) != (n,):
            raise lb.bad(layer, "weight_s_channel", self.name, f"shape {list(s_ch.shape)}, needs [{n}]")
        if bits == 6 and cb is not None:
            raise lb.bad(layer, "weight_codebook", self.name, "6-bit storage takes no codebook")
        if cb is not None and tuple(cb.shape) != (16,):
            raise lb.bad(layer, "weight_codebook", self.name, f"shape {list(cb.shape)}, needs [16]")
        codes = unpack_codes(q, k, bits)
        if cb is not None:
            values = cb.to(device=codes.device, dtype=torch.float32)[codes]
        else:
            values = codes.float() - float(1 << (bits - 1))
        values = values.view(n, k // g, g) * s_rel.float().unsqueeze(-1)
        i8 = values.view(n, k).round().clamp_(-127, 127).to(torch.int8)
        rot = (i8.float().view(n, k // g, g) * s_ch.float().view(n, 1, 1)).view(n, k).to(dtype)
        h = hadamard.matrix(G).to(device=rot.device, dtype=dtype)
        return torch.matmul(rot.reshape(n, k // G, G), h.T).reshape(n, k).to(dtype)

    def check(self, layer: str, m: dict, T: dict) -> list[Violation]:
        out: list[Violation] = []
        w = T[f"{layer}.weight"]
        fmt = self.comfy_format
        lb.check_tensor(out, layer, T, "weight", ("I8",), None, fmt)
        if len(w.shape) != 2:
            return out + [Violation("wrong-weight-shape", w.name, f"quantized weight is {len(w.shape)}-D; must be 2-D")]
        g = m.get("group_size", GROUP)
        if not isinstance(g, int) or isinstance(g, bool) or g < 4 or (16 % g and g % 16):
            return out + [Violation("bad-marker", f"{layer}.comfy_quant",
                                    f"{fmt} group_size {g!r} must be >= 4 and divide 16 or be a multiple of 16")]
        if not lb.check_tensor(out, layer, T, "weight_s_rel", ("F8_E4M3", "U8"), None, fmt):
            return out
        s = T[f"{layer}.weight_s_rel"]
        n = w.shape[0]
        if len(s.shape) != 2 or s.shape[0] != n:
            return out + [Violation("wrong-scale-shape", s.name, f"{fmt} weight_s_rel must be [{n}, K/{g}], not {list(s.shape)}")]
        k = s.shape[1] * g
        bits = bits_of(m, {"weight": tuple(w.shape), "weight_s_rel": tuple(s.shape)})
        if bits is None:
            out.append(Violation("wrong-weight-shape", w.name, f"{fmt} weight row {w.shape[1]} bytes is neither K/2 "
                                 f"({k // 2}, 4-bit) nor 3K/4 ({3 * k // 4}, 6-bit) for K={k}"))
        lb.check_tensor(out, layer, T, "weight_s_channel", ("F32",), (n,), fmt)
        if k % 16 or (bits == 6 and (k % 32 or g % 16)):
            out.append(Violation("wrong-weight-shape", w.name, f"{fmt} K={k} breaks the {bits}-bit layout rules"))
        lb.check_convrot_group(out, layer, m, k, fmt)
        cb = T.get(f"{layer}.weight_codebook")
        if cb is not None:
            if bits == 6:
                out.append(Violation("codebook-on-6bit", cb.name, f"{fmt} 6-bit storage is uniform: comfy-kitchen "
                                     "raises on a codebook"))
            else:
                lb.check_tensor(out, layer, T, "weight_codebook", ("F32",), (16,), fmt)
        return out


W4A8 = register(W4A8Format("w4a8", 4, "4-bit Lloyd-Max codes of W rotated by ConvRot, fp8 group + fp32 row "
                           "scales (W4A8 INT8 kernels)"))
W4A8_6BIT = register(W4A8Format("w4a8-6bit", 6, "6-bit uniform codes of W rotated by ConvRot, fp8 group + fp32 "
                                "row scales (asym_w4a8_int8, 3K/4-byte rows)"))


# ---- learned rounding's grid (quantkit.learned.learn_format) ----

class W4A8Grid:
    """The format's decoded INT8 levels of W rotated by its butterfly; the objective in the rotated
    basis (H -> B H B). The per-row s_channel is the format's quantizer's (searched on the rotated
    weight, fixed up front: it spans the whole row); each group's s_rel is chosen again when learned
    rounding reaches the group's first column, from the error-updated weights: the e4m3 values within
    :data:`SEARCH_STEPS` codes of the quantizer's, by the squared error at the nearest decoded level
    (:func:`_grid_error`, the quantizer's own score). Each element is rounded to the nearest decoded
    level of its group (``clamp(round(level * s_rel), -127, 127) * s_channel``). Measured on
    all-MiniLM-L6-v2 w4a8 (held-out mean 1-cos, learned + bias correction): 5.97e-3 with s_rel chosen
    so, 6.30e-3 with the quantizer's s_rel kept and columns in act order (RTN 1.71e-2)."""

    block = GROUP
    method = "gptq (group scales chosen with the rounding)"

    def __init__(self, w, h, bits: int, rtn: dict | None = None) -> None:
        import torch
        from quantkit.formats_next import hadamard
        g = lb.convrot_group(w.shape[1])
        self.bits = bits
        self.w = hadamard.rotate(w.float().contiguous(), g)
        self.h = hadamard.rotate_objective(h, g)
        dev = self.w.device
        if rtn is not None:  # the format's own search, already run by the caller
            self.s_rel, self.s_ch = rtn["weight_s_rel"].to(dev).clone(), rtn["weight_s_channel"].to(dev, torch.float32)
            self.cb = rtn["weight_codebook"].to(dev) if "weight_codebook" in rtn else None
        else:
            _, self.s_rel, self.s_ch, self.cb = quantize_rotated(self.w, bits)
        if bits == 6:
            self.table = torch.arange(-W6_LEVELS, W6_LEVELS + 1, dtype=torch.float32, device=dev)
        else:
            self.table = torch.tensor(LLOYD_MAX_16, dtype=torch.float32, device=dev)
        self.raw = self.s_rel.view(torch.uint8).to(torch.int32)  # e4m3 codes of the quantizer's s_rel [N, K/g]
        self.codes = torch.zeros(self.w.shape, dtype=torch.int32, device=dev)
        self.levels = self.order = None
        self._fused = None  # fused_block's buffers

    def choose(self, j0: int, cols) -> None:
        import torch
        gi = j0 // GROUP
        target = cols / self.s_ch[:, None]
        raw0 = self.raw[:, gi]
        best = None
        for d in [0] + [x for s in range(1, SEARCH_STEPS + 1) for x in (-s, s)]:
            cand = (raw0 + d).clamp(0, E4M3_MAX_BITS) if d else raw0
            err = _grid_error(self.table, cand.to(torch.uint8).view(torch.float8_e4m3fn).float(), target, self.bits)
            if best is None:
                best = [cand, err]
                continue
            take = err < best[1]  # the first best: the quantizer's own s_rel wins ties
            best = [torch.where(take, cand, best[0]), torch.where(take, err, best[1])]
        s_rel = best[0].to(torch.uint8).view(torch.float8_e4m3fn)
        self.s_rel[:, gi] = s_rel
        # decoded levels may repeat or reorder (clamp, round): nearest over the sorted ones, code by order
        self.levels, self.order = _grid(self.table, s_rel.float()).sort(dim=-1, stable=True)

    def round(self, j: int, col):
        import torch
        i = _nearest((col / self.s_ch)[:, None], self.levels)
        self.codes[:, j] = torch.gather(self.order, 1, i)[:, 0].to(torch.int32) + (1 if self.bits == 6 else 0)
        return torch.gather(self.levels, 1, i)[:, 0] * self.s_ch

    def fused_block(self, w, u, i1: int, i2: int):
        """Columns i1 .. i2 of the loop (choose + round, errors fed forward inside the block) in one
        Triton launch (:mod:`quantkit.kernels.triton_w4a8_gptq`, the same arithmetic); returns the
        block's scaled errors [N, i2 - i1] for the caller's trailing update."""
        import torch
        from quantkit.kernels import triton_w4a8_gptq as kern
        if self._fused is None:
            n, k = w.shape
            self._fused = (torch.zeros((n, k), dtype=torch.int32, device=w.device), self.raw.clone(),
                           torch.empty((n, kern.COLS), dtype=torch.float32, device=w.device),
                           self.s_ch.float().contiguous(), self.raw.contiguous())
        codes, raw_out, err, s_ch, raw = self._fused
        kern.w4a8_block(w, u, s_ch, raw, self.table, codes, raw_out, err, i1, i2, SEARCH_STEPS, self.bits == 6)
        self.codes = codes
        self.s_rel = raw_out.to(torch.uint8).view(torch.float8_e4m3fn)
        return err[:, : i2 - i1]

    def stored(self) -> dict:
        out = {"weight": pack_codes(self.codes, self.bits), "weight_s_rel": self.s_rel.contiguous(),
               "weight_s_channel": self.s_ch.contiguous()}
        if self.cb is not None:
            out["weight_codebook"] = self.cb
        return out
