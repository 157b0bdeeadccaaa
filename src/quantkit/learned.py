"""Learned rounding and bias correction: choose q on the format's real grid to lower the layer's
expected output error, measured with calibration statistics.

Objective, for W [N, K] and its dequantization Wq = q * scale (the exact formula of
:func:`quantkit.reference.dequantize`)::

    J(q) = E ||(W - Wq) x||^2 = tr((W - Wq) H (W - Wq)^T),   H = E[x x^T]  (calibration "hessian")

With bias correction the mean error (W - Wq) mu is folded into the bias, so what is left to minimise
is the same trace with the covariance ``C = H - mu mu^T`` in place of H.

Method (per layer, on the grid of the layer's format, scales kept in the format's shape):

1. INT8 only: clipping search. Each scale region (tensor / row / b x b tile) tries
   ``scale = alpha * amax / 127`` for alpha in :data:`CLIP_GRID` and keeps the alpha whose
   round-to-nearest error is lowest on J (rows are independent in J, so per-row is exact; per tile
   uses the tile's diagonal block of H, ignoring cross-tile terms). alpha = 1 (the RTN scale) is
   always a candidate.
2. Sequential error feedback (GPTQ, Frantar et al. 2022): columns in order of decreasing H_kk; each
   column is rounded to the grid with its fixed scale (fp8: clamp and cast; int8: round half even and
   clamp), and its error, weighted by the inverse of the damped H, is pushed onto the columns not yet
   rounded. Damping: ``H + damping * mean(diag H) * I``.
3. Keep RTN (the reference quantizer, bit for bit) whenever the learned q is not lower on J.

Registry formats without a scaled kernel (int8-convrot, mxfp8, nvfp4, the 4-bit ones) give their own
grid (``Format.learn_grid``, :class:`quantkit.formats.base.LearnGrid`): :func:`learn_format` runs the
same error feedback (:func:`gptq_grid`, PyTorch loop) in the format's basis (ConvRot: W B and
B H B), with block scales the format chooses from the error-updated weights where it says so
(nvfp4, awq4, w4a8's s_rel), and keeps the format's RTN bytes where J is not lower.

There is no randomness: a result is a pure function of (W, statistics, options); seeds are not needed.
Layers of the same shape can be processed together (:func:`learn_batch`, the leading batch dim).

Speed: inside each block of :data:`COLUMN_BLOCK` columns the per-column loop runs as one Triton
program per row tile on CUDA (:mod:`quantkit.kernels.triton_gptq`; rows are independent in GPTQ),
so a block costs one kernel launch plus one for the trailing columns, instead of ~11 PyTorch
launches per column (the w4a8 grid has its own block kernel, :mod:`quantkit.kernels.triton_w4a8_gptq`).
The trailing update is a fixed-order chain of rank-1 updates (:func:`trailing_update`: C on the CPU,
Triton on CUDA), not a GEMM, and every kernel rounds each product and difference once, so learned
rounding writes the same bytes on the CPU and on CUDA, at any thread count (measured on Flux shapes,
DEVELOPMENT.md; the fp64 factorization, LAPACK or cuSOLVER, is the one step not in a fixed order).

Data-free subspace objective (:func:`learn_subspace`, ``--learned-objective subspace``): the error
projected on W's top singular subspace, the objective convert_to_quant optimizes. Measured on
all-MiniLM-L6-v2 held-out inputs it is neutral (median 1.000x RTN, range 0.905-1.037x per layer):
it lowers that projected error, not the error on real inputs (DEVELOPMENT.md, issue 5).

Data-free proxy (:func:`proxy_hessian`, library only): H = W^T W / N, i.e. inputs assumed to lie along
the weight's own dominant input directions. Measured worse than RTN on real inputs (DEVELOPMENT.md,
issue 5), so the converter refuses learned rounding on it; without calibration only the subspace
objective above is offered, on request.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .formats import scaled
from .errors import QuantkitError
from .formats.scaled import ScaledFormat

CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(13))  # 1.00, 0.98, ..., 0.76
DEFAULT_DAMPING = 1.0  # see DEVELOPMENT.md (issue 5): few calibration rows need strong damping
COLUMN_BLOCK = 128


@dataclass(frozen=True)
class LearnedOptions:
    damping: float = DEFAULT_DAMPING  # relative to mean(diag H)
    clip_search: bool = True  # int8 only
    device: str | None = None  # None: cuda when available, else cpu
    objective: str = "calibration"  # or "subspace": data-free, W's top singular subspace (see learn_subspace)
    subspace_weight_cost: float = 20.0  # "subspace" only: gamma of learn_subspace's score
    subspace_target_db: float = 3.0  # "subspace" only: stop once the projected error is this far below RTN's
    grid_damping: float | None = None  # formats giving their own grid: None takes the grid's measured default


@dataclass
class LearnedResult:
    q: torch.Tensor  # [N, K] in spec.weight_dtype
    scale: torch.Tensor  # fp32, spec.scale_shape
    objective_rtn: float  # J(RTN) / tr(W H W^T): relative output error on the calibration statistics
    objective: float  # J(chosen) / tr(W H W^T)
    method: str  # "gptq", "gptq+clip", or "rtn (...)" when RTN was kept

    def dequantize(self, spec: ScaledFormat, block_size: int) -> torch.Tensor:
        return scaled.dequantize(self.q, self.scale, spec, block_size, torch.float32)

    @property
    def note(self) -> str:
        """What the converter's report says about this layer."""
        return f"{self.method}: objective {self.objective_rtn:.3g} -> {self.objective:.3g}"


def pick_device(device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def element_scale(scale: torch.Tensor, shape: tuple[int, int], spec: ScaledFormat, block_size: int) -> torch.Tensor:
    """The scale of every element, [N, K] (a view where possible)."""
    n, k = shape
    if spec.granularity == "tensor":
        return scale.reshape(1, 1).expand(n, k)
    if spec.granularity == "row":
        return scale.reshape(n, 1).expand(n, k)
    b = block_size
    return scale[:, None, :, None].expand(n // b, b, k // b, b).reshape(n, k)


def to_grid(x: torch.Tensor, spec: ScaledFormat) -> torch.Tensor:
    """``x = w / scale`` (fp32) -> the grid value q as fp32, exactly as :mod:`quantkit.reference` rounds."""
    if spec.is_int:
        return x.round().clamp(-spec.qmax, spec.qmax)
    return x.clamp(-spec.qmax, spec.qmax).to(spec.weight_dtype).float()


def objective(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """tr(E H E^T) per batch element, E = w - deq; w, deq [B, N, K], h [B, K, K]; fp64 result [B]."""
    e = w - deq
    return ((e @ h) * e).sum(dim=(1, 2), dtype=torch.float64)


def _clip_search(w: torch.Tensor, h: torch.Tensor, spec: ScaledFormat, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scale region, the alpha in CLIP_GRID minimising the RTN error on J. w [N,K], h [K,K].
    Returns (scale, alpha per region)."""
    n, k = w.shape
    amax = scaled.region_amax(w, spec, block_size).to(w.device)
    best_obj = best_scale = best_alpha = None
    for alpha in CLIP_GRID:
        scale = scaled.scale_from_amax(amax * alpha, spec)
        scale = torch.where(amax == 0, torch.ones_like(scale), scale)
        s = element_scale(scale, (n, k), spec, block_size)
        e = w - to_grid(w / s, spec) * s
        if spec.granularity == "tensor":
            obj = ((e @ h) * e).sum(dtype=torch.float64)
        elif spec.granularity == "row":
            obj = ((e @ h) * e).sum(1, keepdim=True, dtype=torch.float64)
        else:
            b = block_size
            hb = torch.stack([h[j:j + b, j:j + b] for j in range(0, k, b)])  # [K/b, b, b]
            ev = e.view(n, k // b, b)
            per_row = torch.einsum("nja,jab,njb->nj", ev, hb, ev).double()  # [N, K/b]
            obj = per_row.view(n // b, b, k // b).sum(1)
        if best_obj is None:
            best_obj, best_scale = obj, scale
            best_alpha = torch.ones_like(obj)
        else:
            better = obj < best_obj
            best_obj = torch.where(better, obj, best_obj)
            best_scale = torch.where(better, scale, best_scale)
            best_alpha = torch.where(better, torch.full_like(best_alpha, alpha), best_alpha)
    return best_scale, best_alpha


_KERNEL_BROKEN: str | None = None  # why the Triton kernel failed on this machine (then the loop is used)


def _kernel_available(device: torch.device) -> bool:
    if device.type != "cuda" or _KERNEL_BROKEN is not None:
        return False
    try:
        from .kernels import triton_gptq  # noqa: F401
    except Exception:  # triton missing or unusable: the PyTorch loop computes the same thing
        return False
    return True


def gptq(w: torch.Tensor, s: torch.Tensor, h: torch.Tensor, spec: ScaledFormat,
         damping: float = DEFAULT_DAMPING, *, kernel: bool | None = None) -> torch.Tensor:
    """Sequential error feedback on a fixed per-element scale. w, s [B, N, K] fp32, h [B, K, K].
    Returns the grid values q [B, N, K] (fp32 holding exact grid points).

    Columns go in blocks of :data:`COLUMN_BLOCK`; inside a block the per-column loop runs in one
    Triton program per row tile (:mod:`quantkit.kernels.triton_gptq`) when ``kernel`` is True
    (default: on CUDA when Triton imports), else as a PyTorch loop, the same arithmetic; the trailing
    update of the columns right of the block is :func:`trailing_update`'s fixed-order chain, so the
    grid values do not depend on the device, the GEMM library or the thread count."""
    global _KERNEL_BROKEN
    bsz, n, k = w.shape
    auto = kernel is None
    if auto:
        kernel = _kernel_available(w.device)
    h = h.clone()
    diag = h.diagonal(dim1=1, dim2=2)
    from .formats._lowbit import tree_sum
    mean_diag = (tree_sum(diag.double()) / k).to(h.dtype).clamp_min(torch.finfo(torch.float32).tiny)
    diag += (damping * mean_diag)[:, None]
    perm = torch.argsort(diag, dim=1, descending=True, stable=True)  # [B, K]
    idx = perm[:, None, :].expand(bsz, n, k)
    w = torch.gather(w, 2, idx).contiguous()
    s = torch.gather(s, 2, idx).contiguous()
    h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand(bsz, k, k)), 2, perm[:, None, :].expand(bsz, k, k))
    chol, info = torch.linalg.cholesky_ex(h.double())
    if bool((info != 0).any()):
        raise QuantkitError("calibration statistics are not positive definite even after damping",
                            fix="capture over more rows, or raise the damping")
    del h
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).to(w.dtype).contiguous()  # [B, K, K]
    del chol
    q = torch.empty_like(w)
    if kernel:
        from .kernels.triton_gptq import gptq_block
        err_buf = torch.empty((bsz, n, COLUMN_BLOCK), dtype=w.dtype, device=w.device)
    for i1 in range(0, k, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, k)
        if kernel and auto and i1 == 0:
            try:  # first launch compiles; a Triton/driver failure falls back to the loop, loudly
                gptq_block(w, s, u, q, err_buf, i1, i2, spec)
            except Exception as e:  # noqa: BLE001
                _KERNEL_BROKEN = f"{type(e).__name__}: {e}"
                warnings.warn(f"quantkit: the Triton GPTQ kernel failed ({_KERNEL_BROKEN}); using the slower "
                              "PyTorch column loop", RuntimeWarning, stacklevel=2)
                kernel = False
        elif kernel:
            gptq_block(w, s, u, q, err_buf, i1, i2, spec)
        if kernel:
            err1 = err_buf[:, :, :i2 - i1]
        else:
            w1 = w[:, :, i1:i2].clone()
            err1 = torch.empty_like(w1)
            u1 = u[:, i1:i2, i1:i2]
            for j in range(i2 - i1):
                col, sc = w1[:, :, j], s[:, :, i1 + j]
                g = to_grid(col / sc, spec)
                q[:, :, i1 + j] = g
                err = (col - g * sc) / u1[:, j, j][:, None]
                w1[:, :, j:] -= err[:, :, None] * u1[:, None, j, j:]
                err1[:, :, j] = err
        if i2 < k:
            for b in range(bsz):
                trailing_update(w[b, :, i2:], err1[b], u[b, i1:i2, i2:], kernel=kernel)
    inv = torch.argsort(perm, dim=1)
    return torch.gather(q, 2, inv[:, None, :].expand(bsz, n, k))


def _bytes_needed(n: int, k: int, bsz: int) -> int:
    # w, s, q, e (+ gather copies) [N,K] x ~6 and h, chol, u [K,K] x 3 (+ fp64 factorisation x2), fp32.
    return bsz * 4 * (6 * n * k + 5 * k * k)


def check_memory(name: str, n: int, k: int, bsz: int, device: torch.device) -> None:
    """Raise a clear error when a layer's learned rounding cannot fit the GPU (never degrade silently)."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    need = _bytes_needed(n, k, bsz)
    if need > free:
        raise QuantkitError(f"learned rounding of a {n}x{k} weight needs about {need / 2**30:.1f} GiB of GPU "
                            f"memory, {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB are free", tensor=name,
                            fix=f"free GPU memory, run on CPU with CUDA_VISIBLE_DEVICES='', or keep RTN for it "
                                f"with --exclude '^{name}$'")


def learn_batch(ws: list[torch.Tensor], hs: list[torch.Tensor], spec: ScaledFormat, block_size: int,
                options: LearnedOptions = LearnedOptions(), names: list[str] | None = None) -> list[LearnedResult]:
    """Learned rounding for layers of one shape at once (GPU-friendly). ``ws`` [N, K] (any float dtype),
    ``hs`` [K, K] the objective's second-moment matrices. One :class:`LearnedResult` per layer."""
    if not ws:
        return []
    dev = pick_device(options.device)
    n, k = ws[0].shape
    if any(tuple(w.shape) != (n, k) for w in ws) or any(tuple(h.shape) != (k, k) for h in hs):
        raise QuantkitError("learn_batch needs weights of one shape and matching K x K statistics",
                            fix="group layers by shape")
    names = names or [f"#{i}" for i in range(len(ws))]
    check_memory(names[0], n, k, len(ws), dev)
    w = torch.stack([x.to(dev, torch.float32) for x in ws])
    h = torch.stack([x.to(dev, torch.float32) for x in hs])
    scales, s_elem, tags = [], [], []
    for i in range(len(ws)):
        if spec.is_int and options.clip_search:
            sc, alpha = _clip_search(w[i], h[i], spec, block_size)
            tags.append("gptq+clip" if bool((alpha < 1).any()) else "gptq")
        else:
            sc = scaled.compute_scale(w[i], spec, block_size)
            tags.append("gptq")
        scales.append(sc)
        s_elem.append(element_scale(sc, (n, k), spec, block_size))
    s = torch.stack(s_elem)
    g = gptq(w, s, h, spec, options.damping)
    deq = g * s
    rtn = []
    for i in range(len(ws)):
        q0, sc0 = scaled.quantize(w[i], spec, block_size)  # w[i]: already on dev (fp32, same bits)
        rtn.append((q0, sc0, scaled.dequantize(q0, sc0, spec, block_size, torch.float32)))
    j_learn = objective(w, deq, h)
    j_rtn = objective(w, torch.stack([r[2] for r in rtn]), h)
    j_ref = objective(w, torch.zeros_like(w), h).clamp_min(torch.finfo(torch.float64).tiny)
    out = []
    for i in range(len(ws)):
        jr, jl = float(j_rtn[i] / j_ref[i]), float(j_learn[i] / j_ref[i])
        if jl < jr:
            out.append(LearnedResult(g[i].to(spec.weight_dtype).cpu(), scales[i].float().cpu(), jr, jl, tags[i]))
        else:
            out.append(LearnedResult(rtn[i][0].cpu(), rtn[i][1].cpu(), jr, jr, "rtn (learned not better)"))
    return out


def learn(w: torch.Tensor, h: torch.Tensor, spec: ScaledFormat, block_size: int,
          options: LearnedOptions = LearnedOptions(), name: str = "") -> LearnedResult:
    return learn_batch([w], [h], spec, block_size, options, [name or "weight"])[0]


SUBSPACE_TOP_P, SUBSPACE_MIN_K, SUBSPACE_MAX_K = 0.2, 256, 1280  # convert_to_quant's defaults
SUBSPACE_STEP = 0.05  # fraction of the projected error fed back per iteration
SUBSPACE_ITERS = 24
SUBSPACE_PATIENCE = 4


def subspace_rank(n: int, k: int) -> int:
    """k = clamp(0.2 * min(N, K), 256, 1280), as convert_to_quant (top_p, min_k, max_k)."""
    return min(max(int(SUBSPACE_TOP_P * min(n, k)), SUBSPACE_MIN_K), SUBSPACE_MAX_K, min(n, k))


def subspace_basis(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W's top-``rank`` left and right singular vectors (U_k [N, r], V_k [K, r], fp32), from the
    eigenvectors of the smaller Gram matrix (fp64 eigensolver: near-equal singular values of the noise
    floor would otherwise reorder)."""
    n, k = w.shape
    w64 = w.double()
    if k <= n:
        _, vec = torch.linalg.eigh(w64.T @ w64)
        v = vec[:, -rank:]
        u = w64 @ v
        u = u / u.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    else:
        _, vec = torch.linalg.eigh(w64 @ w64.T)
        u = vec[:, -rank:]
        v = w64.T @ u
        v = v / v.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    return u.float().contiguous(), v.float().contiguous()


def learn_subspace(w: torch.Tensor, spec: ScaledFormat, block_size: int, options: LearnedOptions = LearnedOptions(),
                   name: str = "") -> LearnedResult:
    """Data-free learned rounding on W's top singular subspace (the objective convert_to_quant uses):
    J(q) = ||U_k^T (W - Wq) V_k||_F^2, k = :func:`subspace_rank` (20% of min(N, K), within 256..1280).

    Scales are the RTN scales. Projected error feedback: q_t = grid((W + c_t) / s) with
    c_{t+1} = c_t + SUBSPACE_STEP * U_k U_k^T (W - Wq_t) V_k V_k^T, i.e. the rounding threshold of each
    element is shifted by the part of the error that lies in the subspace, so elements near a rounding
    tie flip (cheap on plain weight error) where that cancels projected error. Each step flips more
    elements, so the weight error only grows with t: the first iterate whose J is
    ``options.subspace_target_db`` below J_rtn (3 dB: half the projected error) is kept and the loop
    stops there, spending the least weight SQNR for that gain (RTN minimises plain weight error, and
    the projection is a proxy: on real inputs it did not lower output error, DEVELOPMENT.md). Layers
    that never reach the target keep the iterate with the best
    ``J/J_rtn + gamma * ||W - Wq||^2 / ||W - Wq_rtn||^2`` (gamma = ``options.subspace_weight_cost``),
    the target iterate too must beat RTN on that score; RTN (t = 0) whenever no iterate does.
    ``objective_rtn``/``objective`` are J relative to ||U_k^T W V_k||^2. Deterministic; no calibration."""
    dev = pick_device(options.device)
    n, k = w.shape
    check_memory(name or "weight", n, k, 1, dev)
    w32 = w.to(dev, torch.float32)
    u, v = subspace_basis(w32, subspace_rank(n, k))
    q0, sc0 = scaled.quantize(w32, spec, block_size)
    s = element_scale(sc0.float(), (n, k), spec, block_size)
    ref = float((u.T @ w32 @ v).double().pow(2).sum()) or 1.0
    c = torch.zeros_like(w32)
    best = None
    base_j = base_e = None
    stall = 0
    for t in range(SUBSPACE_ITERS + 1):
        g = to_grid((w32 + c) / s, spec)
        e = w32 - g * s
        a = u.T @ e @ v
        j = float(a.double().pow(2).sum())
        ee = float(e.double().pow(2).sum())
        if t == 0:
            base_j, base_e = max(j, torch.finfo(torch.float64).tiny), max(ee, torch.finfo(torch.float64).tiny)
            target_j = base_j * 10 ** (-options.subspace_target_db / 10)
        score = j / base_j + options.subspace_weight_cost * ee / base_e
        if t > 0 and j <= target_j and score < 1.0 + options.subspace_weight_cost:
            best = (score, t, g, j)
            break
        if best is None or score < best[0]:
            best, stall = (score, t, g, j), 0
        else:
            stall += 1
            if stall >= SUBSPACE_PATIENCE:
                break
        c += SUBSPACE_STEP * ((u @ a) @ v.T)
    _, t_best, g, j = best
    jr = base_j / ref
    if t_best == 0:
        return LearnedResult(q0.cpu(), sc0.cpu(), jr, jr, "rtn (learned not better; subspace objective)")
    return LearnedResult(g.to(spec.weight_dtype).cpu(), sc0.float().cpu(), jr, j / ref, f"subspace ({t_best} steps)")


def proxy_hessian(w: torch.Tensor) -> torch.Tensor:
    """Data-free stand-in for E[x x^T]: W^T W / N (fp32)."""
    w32 = w.float()
    return w32.T @ w32 / w32.shape[0]


def objective_matrix(stats: dict[str, torch.Tensor], bias_correction: bool) -> torch.Tensor:
    """H = E[x x^T] (or its diagonal when captured with second_order='diag'); C = H - mu mu^T when the
    bias absorbs the mean error."""
    h = stats["hessian"].float() if "hessian" in stats else torch.diag(stats["mean_sq"].float())
    if bias_correction:
        mu = stats["mean"].float()
        h = h - torch.outer(mu, mu)
    return h


def corrected_bias(bias: torch.Tensor, w: torch.Tensor, deq: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """b' = b + (W - Wq) mu, computed in fp32 (fp64 accumulation), returned in the bias's dtype and shape."""
    delta = (w.double() - deq.double()) @ mean.double()
    return (bias.double() + delta).to(bias.dtype)


def static_input_scale(stats: dict[str, torch.Tensor], spec) -> torch.Tensor | None:
    """The static activation scale calibration gives a format (its own rule: for fp8, max |x| seen
    over the calibration set / qmax); None where the format stores none."""
    return spec.static_input_scale(stats)


# ---- learned rounding on a format's own grid (formats without a scaled kernel) ----

@dataclass
class FormatResult:
    """Learned rounding of one weight on a registry format's grid (:func:`learn_format`)."""

    stored: dict  # the layer's tensors (suffix -> tensor), as the format's quantize returns them
    objective_rtn: float  # J(RTN) / tr(W H W^T), RTN = the format's own quantizer
    objective: float  # J(chosen) / tr(W H W^T)
    method: str  # "gptq", "gptq+clip", ... or "rtn (learned not better)"

    @property
    def note(self) -> str:
        return f"{self.method}: objective {self.objective_rtn:.3g} -> {self.objective:.3g}"


CHAIN_CHUNK = 1 << 16  # trailing_update's CPU loop works on this many weights at a time (in cache)


def trailing_update(w: torch.Tensor, err: torch.Tensor, u: torch.Tensor, *, kernel: bool = False,
                    native: bool | None = None) -> None:
    """In place ``w -= err @ u`` (w [N, W], err [N, T], u [T, W]) in one fixed order: for i = 0 .. T-1,
    ``w -= err[:, i] * u[i]``, each product and difference rounded once (the unblocked algorithm's own
    arithmetic). A GEMM's summation order depends on the library, the device and the thread count;
    this does not, so learned rounding writes the same bytes on the CPU and on CUDA. ``kernel``: the
    Triton chain (:func:`quantkit.kernels.triton_gptq.rank1_chain`), the same bytes in one launch; on
    the CPU the C chain (:func:`quantkit.kernels.native.rank1_chain`) unless ``native`` is False or
    it is unavailable, else a PyTorch loop (the same bytes)."""
    if kernel:
        from .kernels.triton_gptq import rank1_chain
        rank1_chain(w, err, u)
        return
    if w.device.type == "cpu" and native is not False:
        from .kernels import native as nat
        if nat.available() is None:
            nat.rank1_chain(w, err, u)
            return
    n, width = w.shape
    step = max(16, CHAIN_CHUNK // max(n, 1))
    for c0 in range(0, width, step):
        c1 = min(width, c0 + step)
        sub = w[:, c0:c1]
        tmp = torch.empty((n, c1 - c0), dtype=w.dtype, device=w.device)
        uc = u[:, c0:c1]
        for i in range(err.shape[1]):
            torch.mul(err[:, i:i + 1], uc[i:i + 1], out=tmp)
            sub.sub_(tmp)


def inverse_factor(h: torch.Tensor, damping: float, ordered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, U) for :func:`gptq_grid`: H damped by ``damping`` x mean(diag H) (the mean summed in a
    fixed order, fp64), its columns permuted by decreasing H_kk when ``ordered`` (else natural
    order), and U the upper Cholesky factor of its inverse (fp64 factorizations, U in fp32)."""
    from .formats._lowbit import tree_sum
    k = h.shape[0]
    h = h.float().clone()
    diag = h.diagonal()
    mean = (tree_sum(diag.double()) / k).float().clamp_min(torch.finfo(torch.float32).tiny)
    diag += damping * mean
    perm = torch.argsort(diag, descending=True, stable=True) if ordered else torch.arange(k, device=h.device)
    h = h[perm][:, perm]
    chol, info = torch.linalg.cholesky_ex(h.double())
    if int(info) != 0:
        raise QuantkitError("calibration statistics are not positive definite even after damping",
                            fix="capture over more rows, or raise the damping")
    del h
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float().contiguous()
    return perm, u


def gptq_grid(grid, damping: float = DEFAULT_DAMPING, *, kernel: bool | None = None) -> None:
    """Sequential error feedback (as :func:`gptq`) over the columns of ``grid.w`` [N, K] under
    ``grid.h``, every column rounded by ``grid.round`` (the format's grid) and, for a grid with
    ``block``, each block's scales chosen by ``grid.choose`` from the error-updated weights at the
    block's first column (columns in natural order then; else by decreasing H_kk). The codes stay
    in the grid (its :meth:`stored`).

    A grid with ``fused_block`` runs each column block's loop in one Triton launch when ``kernel``
    is True (default: on CUDA when Triton imports), the same arithmetic as the loop; a kernel that
    fails on its first launch falls back to the loop with a warning, as :func:`gptq`."""
    global _KERNEL_BROKEN
    w = grid.w.float().clone()
    n, k = w.shape
    blk = int(grid.block)
    if blk and (COLUMN_BLOCK % blk or blk <= 0):
        raise ValueError(f"grid block {blk} does not divide {COLUMN_BLOCK}")
    perm, u = inverse_factor(grid.h.to(w.device, torch.float32), damping, ordered=not blk)
    w = w[:, perm].contiguous()
    order = perm.tolist()
    fused = getattr(grid, "fused_block", None)
    auto = kernel is None
    if fused is None or kernel is False or (auto and not _kernel_available(w.device)):
        fused = None
    for i1 in range(0, k, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, k)
        if fused is not None:
            try:
                err1 = fused(w, u, i1, i2)
            except Exception as e:  # noqa: BLE001
                if not (auto and i1 == 0):
                    raise
                _KERNEL_BROKEN = f"{type(e).__name__}: {e}"
                warnings.warn(f"quantkit: the Triton learned-rounding kernel failed ({_KERNEL_BROKEN}); using the "
                              "slower PyTorch column loop", RuntimeWarning, stacklevel=2)
                fused = None
        if fused is not None:
            if i2 < k:
                trailing_update(w[:, i2:], err1, u[i1:i2, i2:], kernel=True)
            continue
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for jj in range(i2 - i1):
            j = i1 + jj
            if blk and j % blk == 0:
                grid.choose(j, w1[:, jj:jj + blk])
            col = w1[:, jj]
            err = (col - grid.round(order[j], col)) / u1[jj, jj]
            w1[:, jj:] -= err[:, None] * u1[None, jj, jj:]
            err1[:, jj] = err
        if i2 < k:
            trailing_update(w[:, i2:], err1, u[i1:i2, i2:], kernel=kernel is True or (auto and _kernel_available(w.device)))


def learn_format(w: torch.Tensor, h: torch.Tensor, fmt, layer_opts=None, options: LearnedOptions = LearnedOptions(),
                 name: str = "", orig_dtype=None) -> FormatResult:
    """Learned rounding of ``w`` [N, K] on registry format ``fmt``'s own grid (``fmt.learn_grid``):
    error feedback (:func:`gptq_grid`) in the format's basis, then the objective of the stored
    tensors dequantized by the format (what ComfyUI computes, fp32) against the format's own
    quantizer; RTN is kept whenever the learned tensors are not lower on J. Runs on the CPU or
    ``options.device``."""
    from .formats.base import LayerOpts
    opts = layer_opts if layer_opts is not None else LayerOpts()
    dev = pick_device(options.device)
    n, k = w.shape
    check_memory(name or "weight", n, k, 1, dev)
    w32 = w.to(dev, torch.float32)
    h32 = h.to(dev, torch.float32)
    from .backend import quantize_stored
    rtn = quantize_stored(w.to(dev), fmt, opts)[0]  # the format's own bytes (its C kernel where it has one)
    grid = fmt.learn_grid(w32, h32, opts, rtn)
    if grid is None:
        raise QuantkitError(f"learned rounding does not run {fmt.name}: the format gives no grid", tensor=name or None,
                            fix="drop --learned-rounding for this format")
    marker = fmt.marker(tuple(w.shape), orig_dtype or w.dtype, opts)
    damping = options.grid_damping if options.grid_damping is not None else getattr(grid, "damping", options.damping)
    gptq_grid(grid, damping)
    got = grid.stored()

    def j_of(stored: dict) -> float:
        deq = fmt.dequantize(stored, marker, torch.float32, name).to(dev, torch.float32)
        return float(objective(w32[None], deq[None], h32[None])[0])

    ref = max(float(objective(w32[None], torch.zeros_like(w32)[None], h32[None])[0]), torch.finfo(torch.float64).tiny)
    jr, jl = j_of(rtn) / ref, j_of(got) / ref
    if jl < jr:
        return FormatResult({s: t.cpu() for s, t in got.items()}, jr, jl, grid.method)
    return FormatResult({s: t.cpu() for s, t in rtn.items()}, jr, jr, "rtn (learned not better)")
