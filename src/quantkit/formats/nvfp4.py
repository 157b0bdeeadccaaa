"""``nvfp4``: FP4 E2M1 elements, one FP8 E4M3 scale per 1 x 16 block, one fp32 scale per tensor.

On disk (ComfyUI's ``nvfp4`` loader; comfy-kitchen ``TensorCoreNVFP4Layout``):

* ``weight``: U8 [Np, Kp/2], W zero-padded to Np = roundup(N, 16), Kp = roundup(K, 16); two E2M1
  codes a byte, the even column in the HIGH nibble (:mod:`._e2m1`)
* ``weight_scale``: F8_E4M3 [Np, Kp/16] block scales in the cuBLAS blocked layout (:mod:`._blocked`),
  shape [roundup(Np, 128), roundup(Kp/16, 4)]
* ``weight_scale_2``: fp32 scalar ``[]`` = amax(|W|) / (448 * 6) (1.0 for an all-zero W)
* ``input_scale``: fp32 scalar ``[]``, only with calibration (``quantkit convert --calibration``; the
  plan lists it for a layer whose statistics saw inputs: ``LayerOpts.static_input_scale``) =
  max |x| over the calibration set / (448 * 6), the activation's per-tensor scale on the format's own
  grid. ComfyUI (0271a469) loads it as a module parameter (``QUANT_ALGOS["nvfp4"]["parameters"]``) and
  passes it to ``TensorCoreNVFP4Layout.quantize(x, scale=input_scale)``: comfy-kitchen's
  ``quantize_nvfp4(x, per_tensor_scale)``, block scales ``clamp((amax_b / 6) / s, max=448)`` in E4M3.
  Without it the scale is dynamic: ``amax(|x|) / (448 * 6)`` of each call's activation.
* ``pre_quant_scale``: optional float [K], read, never written. ComfyUI (0271a469) loads it as a module
  parameter (``QUANT_ALGOS["nvfp4"]["parameters"]``) and its forward multiplies the input by it (cast to
  the input's dtype) before quantizing: AWQ-style smoothing, W stored as W[:, k] / s[k]. quantkit reads
  such files from other producers (the layer's weight is the dequantized one times s per column) but
  does not write it: smoothing picked on the calibration set (s = rms(x)^a / max|W|^b over a grid, kept
  on the 16 of 36 layers where it lowered the calibration output error, by at most 6.7%) made MiniLM's
  held-out W4A4 error worse, 3.133e-2 against 3.010e-2 (``benchmarks/nvfp4_smoothing.py``), and a LoRA
  patched onto a smoothed layer is wrong (ComfyUI adds it to W / s).
* ``.comfy_quant``: ``{"format": "nvfp4", ...}``

Quantization (the spec), all fp32, per block of 16 with amax_b = max |w| and g = weight_scale_2:

* ``b = clamp((amax_b / 6) / g, max=448)``; comfy-kitchen stores ``c0 = e4m3(b)`` (round to nearest
  even by the cast).
* with ``scale_search`` the candidates are the E4M3 values whose codes are ``code(c0) + o`` for o in
  :data:`SEARCH_OFFSETS` (kept within 1..0x7E, i.e. positive and <= 448); each candidate c quantizes
  ``e2m1(clamp(w / (g * c), -6, 6))``; the candidate with the smallest block squared error
  ``sum (w - v * (g * c))^2`` (v the E2M1 value; fp32 terms squared in fp64, fixed pairwise tree)
  wins, ties to the earlier offset in the list (o = 0 first: comfy-kitchen's choice).
* a block whose stored scale is 0 (amax_b = 0, or b below E4M3's smallest subnormal) stores +0 codes.

The search (default on) is still round-to-nearest for every element, only with a better block scale;
offsets +4..+6 are the scales that put the block's amax on 4 instead of 6; +2 and -2 won 1.4% of
MiniLM's blocks and are left out (-0.008 dB mean, 2/9 of the kernel's filter). Measured on
all-MiniLM-L6-v2 (bf16, 37 linears): +1.17..+1.37 dB per layer over comfy-kitchen's quantizer (mean
21.79 vs 20.50 dB); held-out sentence embeddings, mean 1-cos 2.028e-2 vs 2.251e-2
(``benchmarks/nvfp4_search_offsets.py`` has each subset's figure). The error it
minimises is the fp32 dequantization's; kitchen's quantizer (an all-zero W gives g = 0 and NaN
block scales there) is matched byte for byte with ``scale_search=False`` otherwise.

Dequantization (comfy-kitchen eager), in the compute dtype D: ``LUT_D[code] * (g.to(D) * c.to(D))``
(the scale product rounds in D first), cut to [N, K].

torch is imported inside the functions: the registry stays importable without it.
"""

from __future__ import annotations

from ..errors import QuantkitError
from .base import (Format, LayerOpts, Stored, Violation, blocked_scale_shape, padded_2d, plain_marker, register,
                   roundup, shape_reason)

NAME = "nvfp4"
COMFY_FORMAT = "nvfp4"
LAYOUT = "TensorCoreNVFP4Layout"
BLOCK = 16
PAD = 16
FP8_MAX = 448.0
E2M1_MAX = 6.0
DEFAULT_SEARCH = True
# E4M3 code offsets from comfy-kitchen's block scale tried by the scale search, in tie-break order.
SEARCH_OFFSETS = (0, -1, 1, 3, 4, 5, 6)
_FP8_MAX_CODE = 0x7E
PRE_QUANT_SCALE = "pre_quant_scale"


def padded_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return padded_2d(shape, PAD)


def scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    return blocked_scale_shape(padded_shape(shape), BLOCK)


def cannot_take(shape: tuple[int, ...], **_: object) -> str | None:
    return shape_reason(shape)


def marker(shape: tuple[int, ...], orig_dtype, **_: object) -> dict:
    return plain_marker(COMFY_FORMAT, shape, orig_dtype)


def _block_error(x, g, c):
    """Squared error per block (fp64) of x fp32 [R, B, 16] stored with E4M3 block scales c (fp32
    [R, B]): each element is w - v * (g * c), v its E2M1 value (:func:`._e2m1.round_values`)."""
    import torch

    from . import _e2m1
    from ._common import tree_sum_fp64
    total = g * c
    safe = torch.where(total == 0, torch.ones_like(total), total)[..., None]
    v = _e2m1.round_values((x / safe).clamp(-_e2m1.MAX, _e2m1.MAX))
    v = torch.where((total == 0)[..., None], torch.zeros_like(v), v)
    return tree_sum_fp64(x - v * total[..., None])


def _codes(x, g, c):
    import torch

    from . import _e2m1
    total = g * c
    zero = total == 0
    safe = torch.where(zero, torch.ones_like(total), total)[..., None]
    codes = _e2m1.encode((x / safe).clamp(-_e2m1.MAX, _e2m1.MAX))
    return torch.where(zero[..., None], torch.zeros_like(codes), codes)


def global_scale(wf):
    """weight_scale_2 of fp32 W: amax / (448 * 6), 1.0 for an all-zero W."""
    import torch
    from ._common import div
    amax = wf.abs().amax()
    g = div(amax, FP8_MAX * E2M1_MAX)
    return torch.where(g == 0, torch.ones_like(g), g)


def quantize_reference(w, scale_search: bool = DEFAULT_SEARCH, input_scale: float | None = None) -> dict:
    """The spec, written for clarity over the whole tensor (one candidate at a time);
    :func:`quantize` computes the same bytes faster."""
    import torch

    from . import _blocked, _e2m1
    from ._common import as_fp32, pad_to, div
    wf0 = as_fp32(w, NAME)
    g = global_scale(wf0)
    wf = pad_to(wf0, PAD)
    rows, cols = wf.shape
    x = wf.reshape(rows, cols // BLOCK, BLOCK)
    amax_b = x.abs().amax(dim=-1)
    b = div(amax_b, _e2m1.MAX) / g
    best = b.clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    if scale_search:
        code0 = best.view(torch.uint8).to(torch.int32)
        c0 = best
        best_err = _block_error(x, g, c0.float())
        for o in SEARCH_OFFSETS[1:]:
            cc = (code0 + o).clamp(1, _FP8_MAX_CODE).to(torch.uint8).view(torch.float8_e4m3fn)
            cc = torch.where(code0 == 0, c0, cc)  # a zero-scale block stays zero
            err = _block_error(x, g, cc.float())
            win = err < best_err
            best_err = torch.where(win, err, best_err)
            best = torch.where(win, cc, best)
    out = {"weight": _e2m1.pack(_codes(x, g, best.float()).reshape(rows, cols)),
           "weight_scale": _blocked.swizzle(best),
           "weight_scale_2": g.reshape(())}
    if input_scale is not None:
        out["input_scale"] = torch.tensor(float(input_scale), dtype=torch.float32)
    return out


# Elements (x the candidates) one chunk of rows holds in the fast path: its fp32/fp64 temporaries
# (~10 MB) stay near the cache, and there are few enough chunks that per-op overhead is small.
_CHUNK_ELEMS = 1 << 16


def _magnitude_codes(a):
    """E2M1 magnitude codes 0..7 of the grid values ``a`` (0, .5, 1, 1.5, 2, 3, 4, 6), by arithmetic."""
    import torch
    c = torch.where(a < 2, a * 2, torch.where(a < 4, a + 2, a * 0.5 + 4))
    return c.to(torch.uint8)


def _search_rows(x, g, offsets):
    """Fast path of the scale search over fp32 blocks ``x`` [r, B, 16]: every candidate of every block
    at once ([r, B, C, 16]); returns (E4M3 block scales [r, B], uint8 codes [r, B, 16]). Same
    arithmetic as :func:`_block_error` / :func:`_codes` per candidate, so the same bits; the winner is
    the first candidate of smallest error, as the reference's strict ``<`` in offset order picks."""
    import torch

    from ._common import tree_sum_fp64, div
    amax_b = x.abs().amax(dim=-1)
    b = div(amax_b, E2M1_MAX) / g
    c0 = b.clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    code0 = c0.view(torch.uint8).to(torch.int32)[..., None]
    cc = (code0 + offsets).clamp(1, _FP8_MAX_CODE).to(torch.uint8)
    cc = torch.where(code0 == 0, torch.zeros_like(cc), cc).view(torch.float8_e4m3fn)  # a zero scale stays zero
    total = g * cc.float()  # [r, B, C]
    zero = total == 0
    y = (x[:, :, None, :] / torch.where(zero, torch.ones_like(total), total)[..., None]).clamp_(-E2M1_MAX, E2M1_MAX)
    # E2M1 round to nearest even (as _e2m1.round_values): steps of .5 below 2, 1 below 4, 2 up to 6
    a = y.abs()
    m = torch.where(a < 2, 2.0, torch.where(a < 4, 1.0, 0.5))
    v = (y * m).round_().div_(m)  # a power-of-two multiply and divide: exact
    v.masked_fill_(zero[..., None], 0.0)
    err = tree_sum_fp64(x[:, :, None, :] - v * total[..., None])
    win = err.argmin(dim=-1, keepdim=True)  # the first minimum
    best = cc.view(torch.uint8).gather(-1, win)[..., 0].view(torch.float8_e4m3fn)
    vb = v.gather(2, win[..., None].expand(-1, -1, 1, v.shape[-1]))[:, :, 0, :]
    codes = _magnitude_codes(vb.abs()) | (torch.signbit(vb).to(torch.uint8) << 3)
    return best, codes


def quantize(w, scale_search: bool = DEFAULT_SEARCH, input_scale: float | None = None) -> dict:
    """The stored tensors of W: the bytes of :func:`quantize_reference`, computed in row chunks with
    the search's candidates batched (tests hold the two to the same bytes)."""
    if not scale_search:
        return quantize_reference(w, scale_search, input_scale)
    import torch

    from . import _blocked, _e2m1
    from ._common import as_fp32
    wf = as_fp32(w, NAME)
    g = global_scale(wf)
    n, k = wf.shape
    rows, cols = padded_shape((n, k))
    nb = cols // BLOCK
    packed = torch.zeros(rows, cols // 2, dtype=torch.uint8, device=wf.device)  # padded rows: +0 codes, zero scales
    scales = torch.zeros(rows, nb, dtype=torch.uint8, device=wf.device)
    offsets = torch.tensor(SEARCH_OFFSETS, dtype=torch.int32, device=wf.device)
    step = max(1, _CHUNK_ELEMS // cols)
    for i in range(0, n, step):
        j = min(n, i + step)
        x = wf[i:j]
        if cols > k:
            x = torch.nn.functional.pad(x, (0, cols - k))
        best, codes = _search_rows(x.reshape(j - i, nb, BLOCK), g, offsets)
        scales[i:j] = best.view(torch.uint8)
        packed[i:j] = _e2m1.pack(codes.reshape(j - i, cols))
    out = {"weight": packed, "weight_scale": _blocked.swizzle(scales.view(torch.float8_e4m3fn)),
           "weight_scale_2": g.reshape(())}
    if input_scale is not None:
        out["input_scale"] = torch.tensor(float(input_scale), dtype=torch.float32)
    return out


def dequantize(tensors: dict, marker: dict, dtype) -> object:
    """What ComfyUI computes (comfy-kitchen eager), in compute dtype ``dtype``, cut to [N, K]."""
    import torch

    from . import _blocked, _e2m1
    from ._common import orig_shape_of
    n, k = orig_shape_of(marker, NAME)
    q, s, g = tensors["weight"], tensors["weight_scale"], tensors["weight_scale_2"]
    rows, cols = padded_shape((n, k))
    if q.dtype != torch.uint8 or tuple(q.shape) != (rows, cols // 2):
        raise QuantkitError(f"{NAME}: weight {q.dtype} {tuple(q.shape)} is not U8 [{rows},{cols // 2}] "
                            f"for a {n}x{k} layer", fix="re-convert the layer")
    if s.dtype not in (torch.float8_e4m3fn, torch.uint8) or tuple(s.shape) != scale_shape((n, k)):
        raise QuantkitError(f"{NAME}: weight_scale {s.dtype} {tuple(s.shape)} is not F8_E4M3 "
                            f"{list(scale_shape((n, k)))}", fix="re-convert the layer")
    if g.numel() != 1:
        raise QuantkitError(f"{NAME}: weight_scale_2 has shape {tuple(g.shape)}, expected a scalar",
                            fix="re-convert the layer")
    vals = _e2m1.lut(dtype).to(q.device)[_e2m1.unpack(q).long()].reshape(rows, cols // BLOCK, BLOCK)
    c = _blocked.unswizzle(s.view(torch.float8_e4m3fn), rows, cols // BLOCK)
    total = g.float().to(dtype) * c.to(dtype)
    return (vals * total[..., None]).reshape(rows, cols).to(dtype)[:n, :k]


def static_input_scale(stats: dict):
    """See :meth:`NVFP4Format.static_input_scale`."""
    import torch
    from ._common import div
    amax = stats["absmax"].float().amax()
    if not bool(torch.isfinite(amax)) or float(amax) <= 0:
        return None
    return div(amax, FP8_MAX * E2M1_MAX).reshape(())


def _is_scalar(t) -> bool:
    return t.numel == 1 and len(t.shape) <= 1


class NVFP4Format(Format):
    name = NAME
    comfy_format = COMFY_FORMAT
    summary = "FP4 E2M1 packed two a byte, padded to 16; FP8 E4M3 scale per 1x16 block, fp32 per tensor"
    stock_comfy = True
    fallback = True  # padding takes every 2-D shape
    kernel = None
    native = "nvfp4"
    triton = "nvfp4"
    runtime_layout = LAYOUT
    weight_dtype_name = "U8"
    input_smoothing = PRE_QUANT_SCALE

    def cannot_take(self, shape: tuple[int, ...], opts: LayerOpts) -> str | None:
        return cannot_take(shape)

    def stored(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> list[Stored]:
        rows, cols = padded_shape(shape)
        out = [Stored("weight", "U8", (rows, cols // 2)), Stored("weight_scale", "F8_E4M3", scale_shape(shape)),
               Stored("weight_scale_2", "F32", ())]
        if opts.static_input_scale:  # calibrated: convert writes :meth:`static_input_scale`
            out.append(Stored("input_scale", "F32", ()))
        return out

    def static_input_scale(self, stats: dict):
        """max |x| over the calibration set / (448 * 6) in fp32: the per-tensor activation scale
        comfy-kitchen's ``quantize_nvfp4`` takes (the dynamic one of an input whose amax is the
        calibration's); None (dynamic scaling, nothing stored) when no input was non-zero."""
        return static_input_scale(stats)

    def marker(self, shape: tuple[int, ...], orig_dtype, opts: LayerOpts) -> dict:
        return marker(shape, orig_dtype)

    def describe(self) -> tuple[str, str]:
        return "U8 2xE2M1, pad 16", "F8_E4M3 1x16, fp32 []"

    def quantize(self, w, opts: LayerOpts) -> dict:
        return quantize(w)

    def learn_grid(self, w, h, opts: LayerOpts, rtn: dict | None = None):
        return learn_grid(w, h)

    def dequantize(self, tensors: dict, marker: dict, dtype, layer: str = "") -> object:
        """The weight ComfyUI computes with: with a ``pre_quant_scale`` s, the dequantized W' times s
        per input column (ComfyUI multiplies the input instead; the same product)."""
        from ._common import layer_dequantize
        rows, half = tensors["weight"].shape
        w = layer_dequantize(dequantize, tensors, marker, dtype, layer, (rows, 2 * half))
        s = tensors.get(PRE_QUANT_SCALE)
        if s is None:
            return w
        if s.dim() != 1 or s.shape[0] != w.shape[1] or not s.is_floating_point():
            raise QuantkitError(f"{NAME}: {PRE_QUANT_SCALE} is {s.dtype} {list(s.shape)}, not a float "
                                f"[{w.shape[1]}] (one per input channel)", tensor=f"{layer}.{PRE_QUANT_SCALE}",
                                fix="re-export the layer")
        return w * s.to(device=w.device, dtype=dtype)[None, :]

    def orig_shape(self, marker: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        o = marker.get("orig_shape")
        if isinstance(o, (list, tuple)):
            return tuple(o)
        w = tuple(shapes["weight"])
        return (w[0], 2 * w[1]) if len(w) == 2 else w

    def check(self, layer: str, m: dict, T: dict) -> list[Violation]:
        out = []
        w, s = T[f"{layer}.weight"], T.get(f"{layer}.weight_scale")
        if w.dtype != "U8":
            out.append(Violation("wrong-weight-dtype", w.name, f"nvfp4 weight is {w.dtype}, must be U8 (two E2M1 per byte)"))
        if len(w.shape) != 2:
            return out + [Violation("wrong-weight-shape", w.name,
                                    f"quantized weight is {len(w.shape)}-D {list(w.shape)}; must be 2-D")]
        n, k = w.shape
        if s is None:
            return out + [Violation("missing-scale", w.name, f"nvfp4 needs {layer}.weight_scale; ComfyUI crashes "
                                    "at the layer's first use")]
        orig = m.get("orig_shape")
        if isinstance(orig, (list, tuple)) and len(orig) == 2 and all(isinstance(x, int) for x in orig):
            rows, cols = padded_shape(tuple(orig))
            if (rows, cols // 2) != (n, k):
                out.append(Violation("orig-shape-mismatch", f"{layer}.comfy_quant",
                                     f"orig_shape {list(orig)} packs to {[rows, cols // 2]}, but the weight is {[n, k]}"))
        want = [roundup(n, 128), roundup(2 * k // BLOCK, 4)]
        if s.dtype != "F8_E4M3":
            out.append(Violation("wrong-scale-dtype", s.name, f"nvfp4 block scale is {s.dtype}, must be F8_E4M3"))
        if list(s.shape) != want:
            out.append(Violation("wrong-scale-shape", s.name, f"nvfp4 swizzled scale must be {want}, not {list(s.shape)}"))
        s2 = T.get(f"{layer}.weight_scale_2")
        if s2 is None or s2.dtype != "F32" or not _is_scalar(s2):
            out.append(Violation("missing-scale", f"{layer}.weight_scale_2", "nvfp4 needs an F32 scalar weight_scale_2"))
        i = T.get(f"{layer}.input_scale")
        if i is not None and (i.dtype != "F32" or not _is_scalar(i)):
            out.append(Violation("wrong-scale-shape", i.name,
                                 f"input_scale must be an F32 scalar, not {i.dtype} {list(i.shape)}"))
        p = T.get(f"{layer}.{PRE_QUANT_SCALE}")
        if p is not None:
            k_in = orig[1] if isinstance(orig, (list, tuple)) and len(orig) == 2 else None
            if p.dtype not in ("F32", "BF16", "F16") or len(p.shape) != 1 or (k_in is not None and p.shape[0] != k_in):
                want_k = f"[{k_in}]" if k_in is not None else "[K]"
                out.append(Violation("wrong-scale-shape", p.name, f"{PRE_QUANT_SCALE} must be a float {want_k} "
                                     f"(one per input channel), not {p.dtype} {list(p.shape)}"))
        return out


NVFP4 = register(NVFP4Format())


# ---- learned rounding's grid (quantkit.learned.learn_format) ----

class NVFP4Grid:
    """E2M1 elements; weight_scale_2 from W (:func:`global_scale`), each 1 x 16 block's E4M3 scale
    chosen by the format's scale search (:func:`_search_rows`) from the error-updated weights when
    learned rounding reaches the block's first column."""

    block = BLOCK
    method = "gptq (block scales chosen with the rounding)"

    def __init__(self, w, h) -> None:
        import torch
        self.w, self.h = w.float().contiguous(), h.float()
        self.n, self.k = self.w.shape
        self.g = global_scale(self.w)
        rows, cols = padded_shape((self.n, self.k))
        self.codes = torch.zeros(rows, cols, dtype=torch.uint8, device=self.w.device)
        self.c = torch.zeros(rows, cols // BLOCK, dtype=torch.uint8, device=self.w.device)
        self.offsets = torch.tensor(SEARCH_OFFSETS, dtype=torch.int32, device=self.w.device)
        self.total = None

    def choose(self, j0: int, cols) -> None:
        import torch
        x = cols
        if x.shape[1] < BLOCK:
            x = torch.nn.functional.pad(x, (0, BLOCK - x.shape[1]))
        best, _ = _search_rows(x.reshape(self.n, 1, BLOCK).contiguous(), self.g, self.offsets)
        self.c[:self.n, j0 // BLOCK] = best[:, 0].view(torch.uint8)
        self.total = self.g * best[:, 0].float()

    def round(self, j: int, col):
        import torch

        from . import _e2m1
        zero = self.total == 0
        y = (col / torch.where(zero, torch.ones_like(self.total), self.total)).clamp(-E2M1_MAX, E2M1_MAX)
        code = torch.where(zero, torch.zeros_like(y, dtype=torch.uint8), _e2m1.encode(y))
        self.codes[:self.n, j] = code
        v = torch.where(zero, torch.zeros_like(y), _e2m1.round_values(y))
        return v * self.total

    def stored(self) -> dict:
        import torch

        from . import _blocked, _e2m1
        return {"weight": _e2m1.pack(self.codes), "weight_scale": _blocked.swizzle(self.c.view(torch.float8_e4m3fn)),
                "weight_scale_2": self.g.reshape(())}


def learn_grid(w, h) -> NVFP4Grid:
    return NVFP4Grid(w, h)
