"""``awq4``: unsigned 4-bit weights with a bf16 scale and zero point per group of 64 input channels;
stock ComfyUI's ``awq_w4a16`` (comfy-kitchen ``TensorCoreAWQW4A16Layout``: weight-only, activations
stay in the compute dtype). Data-free: no activation statistics, so "AWQ" here is the storage
format, not the calibration method.

On disk, for a weight [N, K] and G = 64:

* ``weight``: I8 [N, K/2], two unsigned codes 0..15 a byte, even column in the low nibble
* ``weight_scale``: BF16 [K/G, N] and ``weight_zeros`` (with the s: ComfyUI's loader pops exactly
  that name and raises "Missing AWQ W4A16 scale/zeros" without it): BF16 [K/G, N]
* ``.comfy_quant``: ``{"format": "awq_w4a16", "group_size": 64, ...}``

Dequantization (kitchen's layout, bit for bit, compute dtype D):
``((codes.to(D) - 8.0) * scale.t()[..., None] + zeros.t()[..., None])`` per group, in torch's type
promotion of D and bf16 (D for fp32 and bf16; fp32 for fp16). bf16 scales: kitchen's GEMV computes
in the scales' dtype, and bf16 is ComfyUI's usual compute dtype.

Quantization (the spec), per group g of 64 values x (fp32):

1. the min/max baseline: ``s = (max - min) / 15``, ``z = min + 8 s``, both rounded to bf16, codes
   ``q = clamp(round_half_even((x - z) / s + 8), 0, 15)`` (``s == 0``: divide by 1);
2. candidates: the range shrunk to ``[min + a (max - min), max - b (max - min)]`` for a, b in
   :data:`SHRINK` (the baseline is a = b = 0), each with the same rounding;
3. :data:`LS_STEPS` least-squares refits of (s, z) given the codes (the 2x2 normal equations),
   rounded to bf16, codes reassigned; each kept only where it lowers the group's error.

Errors are ``sum((dequant - x)^2)`` through the bf16-rounded scale and zero, summed by
:func:`_lowbit.tree_sum`; a group keeps the first best candidate, so it is never worse than the
min/max baseline. K must be a multiple of 64.
"""

from __future__ import annotations

from . import _lowbit as lb
from .base import Format, LayerOpts, Stored, Violation, dtype_str, register, shape_reason

GROUP = 64
SHRINK = (0.0, 0.02, 0.04, 0.06, 0.08, 0.11, 0.14, 0.18)
LS_STEPS = 3


def _codes(x, s, z):
    import torch
    div = torch.where(s == 0, torch.ones_like(s), s)
    return ((x - z) / div + 8.0).round_().clamp_(0.0, 15.0)


def _err(x, q, s, z):
    return lb.tree_sum(((q - 8.0) * s + z - x).square_())


def quantize_grouped(x, search: bool = True):
    """(codes float [R, G] in 0..15, scale fp32 [R, 1], zero fp32 [R, 1], both bf16 values) of fp32
    groups ``x`` [R, G]; ``search=False``: the min/max baseline alone."""
    import torch

    def bf(t):
        return t.to(torch.bfloat16).to(torch.float32)

    mn = x.amin(dim=1, keepdim=True)
    mx = x.amax(dim=1, keepdim=True)
    rng = mx - mn
    best = None
    for a in (SHRINK if search else (0.0,)):
        for b in (SHRINK if search else (0.0,)):
            lo, hi = (mn, mx) if a == b == 0.0 else (mn + a * rng, mx - b * rng)
            s = bf((hi - lo) / 15.0)
            z = bf(lo + 8.0 * s)
            q = _codes(x, s, z)
            e = _err(x, q, s, z)
            if best is None:
                best = [q, s, z, e]
                continue
            take = e < best[3]
            t1 = take.unsqueeze(1)
            best = [torch.where(t1, q, best[0]), torch.where(t1, s, best[1]), torch.where(t1, z, best[2]),
                    torch.where(take, e, best[3])]
    q, s, z, e = best
    for _ in range(LS_STEPS if search else 0):
        # minimise sum(((q-8) s + z - x)^2) over (s, z): normal equations of u = q - 8
        u = q - 8.0
        n = float(x.shape[1])
        su, sx = lb.tree_sum(u).unsqueeze(1), lb.tree_sum(x).unsqueeze(1)
        suu, sux = lb.tree_sum(u * u).unsqueeze(1), lb.tree_sum(u * x).unsqueeze(1)
        det = n * suu - su * su
        ok = det > 0
        det1 = torch.where(ok, det, torch.ones_like(det))
        s2 = bf(torch.where(ok, (n * sux - su * sx) / det1, s))
        z2 = bf(torch.where(ok, (suu * sx - su * sux) / det1, z))
        s2 = torch.where(s2 > 0, s2, s)
        q2 = _codes(x, s2, z2)
        e2 = _err(x, q2, s2, z2)
        take = e2 < e
        t1 = take.unsqueeze(1)
        q, s, z, e = torch.where(t1, q2, q), torch.where(t1, s2, s), torch.where(t1, z2, z), torch.where(take, e2, e)
    return q, s, z


class AWQ4Format(Format):
    name = "awq4"
    comfy_format = "awq_w4a16"
    summary = "uint4 weight-only, bf16 scale + zero per 64 input channels (W4A16; data-free)"
    stock_comfy = True
    runtime_layout = "TensorCoreAWQW4A16Layout"
    weight_dtype_name = "I8"

    def cannot_take(self, shape: tuple[int, ...], opts: LayerOpts) -> str | None:
        reason = shape_reason(shape)
        if reason:
            return reason
        if shape[1] % GROUP:
            return f"in_features {shape[1]} is not a multiple of the group size {GROUP}"
        return None

    def stored(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> list[Stored]:
        n, k = shape
        return [Stored("weight", "I8", (n, k // 2)), Stored("weight_scale", "BF16", (k // GROUP, n)),
                Stored("weight_zeros", "BF16", (k // GROUP, n))]

    def marker(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> dict:
        return {"format": self.comfy_format, "group_size": GROUP, "orig_dtype": dtype_str(orig_dtype),
                "orig_shape": list(shape)}

    def describe(self) -> tuple[str, str]:
        return "I8 [N,K/2] (uint4 x2)", "bf16 scale + zeros [K/64,N]"

    def quantize(self, w, opts: LayerOpts, layer: str = "", search: bool = True) -> dict:
        import torch
        wf = lb.as_fp32(w, self.name, layer)
        reason = self.cannot_take(tuple(wf.shape), opts)
        if reason:
            raise lb.bad(layer, "weight", self.name, reason)
        n, k = wf.shape
        q, s, z = quantize_grouped(wf.reshape(n * (k // GROUP), GROUP), search)
        codes = q.to(torch.int32).reshape(n, k)
        return {"weight": lb.pack_nibbles(codes),
                "weight_scale": s.reshape(n, k // GROUP).t().contiguous().to(torch.bfloat16),
                "weight_zeros": z.reshape(n, k // GROUP).t().contiguous().to(torch.bfloat16)}

    def learn_grid(self, w, h, opts: LayerOpts, rtn: dict | None = None):
        return AWQ4Grid(w, h)

    def dequantize(self, tensors: dict, marker: dict, dtype, layer: str = ""):
        import torch
        q, s, z = tensors["weight"], tensors["weight_scale"], tensors.get("weight_zeros")
        if z is None:
            raise lb.bad(layer, "weight_zeros", self.name, "no weight_zeros (ComfyUI: Missing AWQ W4A16 scale/zeros)")
        if q.dtype != torch.int8 or q.dim() != 2:
            raise lb.bad(layer, "weight", self.name, f"weight is {q.dtype} {list(q.shape)}, needs I8 [N, K/2]")
        n, k = q.shape[0], q.shape[1] * 2
        g = lb.marker_int(marker, "group_size", GROUP, self.name, layer)
        if k % g:
            raise lb.bad(layer, "comfy_quant", self.name, f"group_size {g} does not divide K={k}")
        for t, suffix in ((s, "weight_scale"), (z, "weight_zeros")):
            if tuple(t.shape) != (k // g, n):
                raise lb.bad(layer, suffix, self.name, f"{suffix} is {list(t.shape)}, needs [{k // g}, {n}]")
        groups = lb.unpack_nibbles(q).view(n, k // g, g).to(dtype)
        return ((groups - 8.0) * s.t().unsqueeze(-1) + z.t().unsqueeze(-1)).view(n, k)

    def orig_shape(self, marker: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        n, kh = shapes["weight"]
        return (n, kh * 2)

    def check(self, layer: str, m: dict, T: dict) -> list[Violation]:
        out: list[Violation] = []
        w = T[f"{layer}.weight"]
        lb.check_tensor(out, layer, T, "weight", ("I8",), None, self.comfy_format)
        if len(w.shape) != 2:
            return out + [Violation("wrong-weight-shape", w.name, f"quantized weight is {len(w.shape)}-D; must be 2-D")]
        n, k = w.shape[0], w.shape[1] * 2
        g = m.get("group_size", GROUP)
        if not isinstance(g, int) or isinstance(g, bool) or g <= 0 or k % g:
            out.append(Violation("bad-marker", f"{layer}.comfy_quant", f"awq_w4a16 group_size {g!r} does not divide K={k}"))
            return out
        for suffix in ("weight_scale", "weight_zeros"):
            lb.check_tensor(out, layer, T, suffix, ("BF16", "F16", "F32"), (k // g, n), self.comfy_format)
        if f"{layer}.weight_zero" in T:
            out.append(Violation("misnamed-zeros", f"{layer}.weight_zero",
                                 "awq_w4a16 zero points are read as weight_zeros; ComfyUI ignores weight_zero"))
        return out


AWQ4 = register(AWQ4Format())


# ---- learned rounding's grid (quantkit.learned.learn_format) ----

class AWQ4Grid:
    """Unsigned 4-bit codes with each group of 64 input channels' bf16 scale and zero chosen by the
    format's search (:func:`quantize_grouped`) from the error-updated weights when learned rounding
    reaches the group's first column."""

    block = GROUP
    method = "gptq (group scales and zeros chosen with the rounding)"

    def __init__(self, w, h) -> None:
        import torch
        self.w, self.h = w.float().contiguous(), h.float()
        n, k = self.w.shape
        self.codes = torch.zeros(n, k, dtype=torch.int32, device=self.w.device)
        self.s = torch.zeros(n, k // GROUP, dtype=torch.float32, device=self.w.device)
        self.z = torch.zeros_like(self.s)
        self.cur = None

    def choose(self, j0: int, cols) -> None:
        _, s, z = quantize_grouped(cols.contiguous())
        self.s[:, j0 // GROUP], self.z[:, j0 // GROUP] = s[:, 0], z[:, 0]
        self.cur = (s[:, 0], z[:, 0])

    def round(self, j: int, col):
        s, z = self.cur
        q = _codes(col, s, z)
        self.codes[:, j] = q.to(self.codes.dtype)
        return (q - 8.0) * s + z

    def stored(self) -> dict:
        import torch
        return {"weight": lb.pack_nibbles(self.codes), "weight_scale": self.s.t().contiguous().to(torch.bfloat16),
                "weight_zeros": self.z.t().contiguous().to(torch.bfloat16)}
