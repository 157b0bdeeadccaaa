"""``int4-convrot``: signed INT4 weights of W rotated along K by a regular Hadamard matrix, one fp32
scale per row; stock ComfyUI's ``convrot_w4a4`` (comfy-kitchen ``TensorCoreConvRotW4A4Layout``).

On disk, for a weight [N, K]:

* ``weight``: I8 [N, K/2], two signed 4-bit codes a byte, even column in the low nibble
* ``weight_scale``: F32 [N]
* ``.comfy_quant``: ``{"format": "convrot_w4a4", "convrot_groupsize": G, "linear_dtype": "int4", ...}``

Dequantization (comfy-kitchen eager, bit for bit): ``((nibble as -8..7).float() * scale[:, None])``
viewed [N, K/G, G], ``torch.matmul`` with H^T in fp32, then cast to the compute dtype.

Quantization (the spec): W in fp32, rotated by the butterfly (:func:`hadamard.rotate`) in groups of
G = the largest of 256 / 64 that divides K (written in the marker; the loader reads it per layer).
Per row r: codes ``q = clamp(round_half_even(r / s), -7, 7)`` (kitchen's emission range), where s is
chosen data-free to minimise ``sum((q s - r)^2)`` (the rotation is orthogonal, so this is the
weight's own squared error): the candidates are kitchen's ``amax / 7`` first, then ``amax / 7 * f``
for f in :data:`SHRINK`, each followed by :data:`LS_STEPS` least-squares refits
``s = <r, q> / <q, q>`` (kept only where they lower the error); ties keep the earlier candidate,
so a row is never worse than kitchen's round-to-nearest. Sums use :func:`_lowbit.tree_sum`.
K must be a multiple of 64 (the INT4 MMA's quant group, which the loader fixes at 64).
"""

from __future__ import annotations

from . import _lowbit as lb
from .base import Format, LayerOpts, Stored, Violation, dtype_str, register, shape_reason

QMAX = 7.0
QUANT_GROUP = 64  # ComfyUI's loader passes quant_group_size=64; the MMA kernel needs K % 64 == 0
# amax/7 times f: the clipping candidates after kitchen's own (f = 1).
SHRINK = tuple(round(1.0 - 0.025 * i, 3) for i in range(1, 21))  # 0.975 .. 0.5
LS_STEPS = 2


def _candidate(r, s):
    """Codes and per-row squared error of rows ``r`` [N, K] at scales ``s`` [N, 1]."""
    q = (r / s).round_().clamp_(-QMAX, QMAX)
    err = lb.tree_sum((q * s - r).square_())
    return q, err


def quantize_rotated(r, search: bool = True):
    """(codes float [N, K] in -7..7, scale fp32 [N]) of already-rotated fp32 rows, as the module
    docstring says; ``search=False``: kitchen's round-to-nearest at ``amax / 7`` alone."""
    import torch
    from ._common import div
    amax = r.abs().amax(dim=1, keepdim=True).clamp_(min=1e-10)
    base = div(amax, QMAX)  # kitchen's scale, as its CPU rounds it
    best_s = base
    best_q, best_e = _candidate(r, base)
    for i, f in enumerate((1.0, *SHRINK) if search else ()):
        s = base if i == 0 else base * f
        q, e = (best_q, best_e) if i == 0 else _candidate(r, s)
        for _ in range(LS_STEPS):
            qq = lb.tree_sum(q * q).unsqueeze(1)
            s_ls = torch.where(qq > 0, lb.tree_sum(r * q).unsqueeze(1) / qq.clamp(min=1e-30), s)
            s_ls = torch.where(s_ls > 0, s_ls, s)
            q2, e2 = _candidate(r, s_ls)
            take = e2 < e
            q = torch.where(take.unsqueeze(1), q2, q)
            s = torch.where(take.unsqueeze(1), s_ls, s)
            e = torch.where(take, e2, e)
        take = e < best_e
        best_q = torch.where(take.unsqueeze(1), q, best_q)
        best_s = torch.where(take.unsqueeze(1), s, best_s)
        best_e = torch.where(take, e, best_e)
    return best_q, best_s.reshape(-1).contiguous()


class Int4ConvRotFormat(Format):
    name = "int4-convrot"
    comfy_format = "convrot_w4a4"
    summary = "INT4 of W rotated by ConvRot (group per layer), one fp32 scale per row (W4A4 kernels)"
    stock_comfy = True
    runtime_layout = "TensorCoreConvRotW4A4Layout"
    weight_dtype_name = "I8"

    def cannot_take(self, shape: tuple[int, ...], opts: LayerOpts) -> str | None:
        reason = shape_reason(shape)
        if reason:
            return reason
        if shape[1] % QUANT_GROUP:
            return f"in_features {shape[1]} is not a multiple of {QUANT_GROUP} (the INT4 kernel's group)"
        return None

    def group(self, shape: tuple[int, ...]) -> int:
        return lb.convrot_group(shape[1])

    def stored(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> list[Stored]:
        n, k = shape
        return [Stored("weight", "I8", (n, k // 2)), Stored("weight_scale", "F32", (n,))]

    def marker(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> dict:
        return {"format": self.comfy_format, "convrot_groupsize": self.group(shape), "linear_dtype": "int4",
                "orig_dtype": dtype_str(orig_dtype), "orig_shape": list(shape)}

    def describe(self) -> tuple[str, str]:
        return "I8 [N,K/2] (INT4 x2, ConvRot)", "fp32 [N]"

    def quantize(self, w, opts: LayerOpts, layer: str = "") -> dict:
        import torch
        from quantkit.formats_next import hadamard
        wf = lb.as_fp32(w, self.name, layer)
        reason = self.cannot_take(tuple(wf.shape), opts)
        if reason:
            raise lb.bad(layer, "weight", self.name, reason)
        r = hadamard.rotate(wf, self.group(tuple(wf.shape)))
        q, scale = quantize_rotated(r)
        return {"weight": lb.pack_nibbles(q.to(torch.int32)), "weight_scale": scale}

    def learn_grid(self, w, h, opts: LayerOpts, rtn: dict | None = None):
        return Int4ConvRotGrid(w, h, self.group(tuple(w.shape)), rtn)

    def dequantize(self, tensors: dict, marker: dict, dtype, layer: str = ""):
        import torch
        from quantkit.formats_next import hadamard
        q, s = tensors["weight"], tensors["weight_scale"]
        if q.dtype != torch.int8 or q.dim() != 2:
            raise lb.bad(layer, "weight", self.name, f"weight is {q.dtype} {list(q.shape)}, needs I8 [N, K/2]")
        n, k = q.shape[0], q.shape[1] * 2
        g = lb.marker_int(marker, "convrot_groupsize", lb.DEFAULT_CONVROT, self.name, layer)
        if not hadamard.is_power_of_4(g) or k % g:
            raise lb.bad(layer, "comfy_quant", self.name, f"convrot_groupsize {g} is not a power of 4 dividing K={k}")
        if s.numel() != n:
            raise lb.bad(layer, "weight_scale", self.name, f"weight_scale has {s.numel()} values for {n} rows")
        nib = lb.unpack_nibbles(q)
        w_int = torch.where(nib >= 8, nib - 16, nib).to(torch.float32)
        w_rot = w_int * s.to(device=w_int.device, dtype=torch.float32).reshape(-1, 1)
        h = hadamard.matrix(g).to(w_rot.device)  # kitchen's call: [N, K/G, G] @ H^T, fp32
        return torch.matmul(w_rot.reshape(n, k // g, g), h.T).reshape(n, k).to(dtype)

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
        lb.check_tensor(out, layer, T, "weight_scale", ("F32", "BF16", "F16"), (n,), self.comfy_format)
        lb.check_convrot_group(out, layer, m, k, self.comfy_format)
        if k % QUANT_GROUP:
            out.append(Violation("wrong-weight-shape", w.name, f"convrot_w4a4 K={k} is not a multiple of {QUANT_GROUP}"))
        if m.get("linear_dtype", "int4") not in ("int4", "int8"):
            out.append(Violation("bad-marker", f"{layer}.comfy_quant",
                                 f"convrot_w4a4 linear_dtype {m.get('linear_dtype')!r} must be int4 or int8"))
        return out


INT4_CONVROT = register(Int4ConvRotFormat())


# ---- learned rounding's grid (quantkit.learned.learn_format) ----

class Int4ConvRotGrid:
    """Signed INT4 (-7..7) per-row grid of W rotated by the format's butterfly; the objective in
    the rotated basis (H -> B H B). Per-row scales fixed up front: the format's searched scale and
    ``amax / 7 * f`` for f in (1, :data:`SHRINK`), per row the one whose round-to-nearest error on J
    is lowest (rows are independent in J)."""

    block = 0
    method = "gptq"

    def __init__(self, w, h, g: int, rtn: dict | None = None) -> None:
        import torch
        from ._common import div
        from quantkit.formats_next import hadamard
        self.w = hadamard.rotate(w.float().contiguous(), g)
        self.h = hadamard.rotate_objective(h, g)
        s0 = rtn["weight_scale"].to(self.w.device, torch.float32) if rtn is not None else quantize_rotated(self.w)[1]
        amax = self.w.abs().amax(dim=1, keepdim=True).clamp_(min=1e-10)
        best, best_obj = None, None
        for s in (s0.reshape(-1, 1), *(div(amax, QMAX) * f for f in (1.0, *SHRINK))):
            e = self.w - (self.w / s).round().clamp(-QMAX, QMAX) * s
            obj = ((e @ self.h) * e).sum(1, keepdim=True, dtype=torch.float64)
            if best is None:
                best, best_obj = s, obj
            else:
                take = obj < best_obj
                best, best_obj = torch.where(take, s, best), torch.where(take, obj, best_obj)
        self.scale = best
        self.q = torch.zeros(self.w.shape, dtype=torch.int32, device=self.w.device)

    def choose(self, j0, cols) -> None:
        pass

    def round(self, j: int, col):
        s = self.scale[:, 0]
        v = (col / s).round().clamp(-QMAX, QMAX)
        self.q[:, j] = v.to(self.q.dtype)
        return v * s

    def stored(self) -> dict:
        return {"weight": lb.pack_nibbles(self.q), "weight_scale": self.scale.reshape(-1).contiguous()}
