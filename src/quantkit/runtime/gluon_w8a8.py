"""int8-block W8A8 GEMM for Hopper (sm_90), in Gluon (Triton's lower-level language).

Same contract and numerics as :func:`quantkit.runtime.triton_w8a8.w8a8_block_matmul` with
``block == 128``: for each 128-deep K-group g, the exact int32 dot of the group's int8 activations
and weights is scaled by ``x_scale[m, g] * w_scale[n // 128, g]`` and added to an fp32 accumulator
in group order.

Why a second kernel: in the Triton kernel every group's tensor-core dot must finish before its
scaling starts, so the tensor cores idle while the CUDA cores scale (0.89x bf16 on an H100). Here
the loop issues the asynchronous ``wgmma`` of group g, then waits only for group g-1's
(``warpgroup_mma_wait(num_outstanding=1)``) and scales it while group g's runs (within each
step of UNROLL groups; the step's last group is scaled after its dot). The operands come
in through a ring of ``STAGES`` shared-memory slots filled by TMA, each slot refilled as soon as
the dot that read it has finished.

Each dot starts from zero (``use_acc=False``); adding 0x4B400000 to its int32 result makes bits that
read as the float 1.5 * 2^23 + dot (exact for |dot| < 2^22; a 128-deep int8 dot is below 2^21), and
one float subtract recovers the dot, with no slow integer-to-float conversion. (Starting each dot
from 0x4B400000 instead, as the Triton kernel does, put that constant in a register that later
became an in-flight accumulator, and ptxas serialised the wgmmas.)

Only used where :func:`usable` says so (an sm_90 GPU, Gluon importable, K a multiple of 128,
16-byte aligned rows); elsewhere the Triton kernel runs. :func:`tuned_block_matmul` times each of
:data:`CONFIGS` and the Triton kernel once per shape and keeps the fastest.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import triton

from .linear import device_capability

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # global -> shared TMA copy: ``async_load`` since Triton 3.7, ``async_copy_global_to_shared`` before
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    HAVE_GLUON = True
except ImportError:  # a Triton without Gluon (before 3.5)
    HAVE_GLUON = False

BLOCK_K = 128
# (BLOCK_M, BLOCK_N, num_warps, STAGES, GROUP_M, UNROLL). Each compiles for sm_90 with no spills and
# no serialised wgmma (tests/test_gluon_w8a8.py checks that with ptxas); UNROLL 4 with 128-column
# tiles spills.
CONFIGS = [(128, 128, 8, 4, 8, 2), (64, 128, 4, 4, 8, 2), (128, 64, 8, 4, 8, 4), (64, 64, 4, 4, 8, 4)]
DEFAULT_CONFIG = CONFIGS[0]


def usable(xq: torch.Tensor, wq: torch.Tensor, block: int) -> bool:
    """True where this kernel can run these operands: sm_90 only (wgmma and TMA are Hopper's; later
    architectures have other tensor-core instructions)."""
    if not (HAVE_GLUON and xq.is_cuda and block == BLOCK_K):
        return False
    if device_capability(xq.device) != (9, 0):
        return False
    k = xq.shape[1]
    return (k % BLOCK_K == 0 and xq.stride(1) == 1 and wq.stride(1) == 1 and xq.stride(0) % 16 == 0
            and wq.stride(0) % 16 == 0 and xq.data_ptr() % 16 == 0 and wq.data_ptr() % 16 == 0)


if HAVE_GLUON:
    @gluon.jit
    def _issue(a_bufs, b_bufs, bars, init, g, STAGES: gl.constexpr):
        """Wait for group g's operands in its ring slot and start its dot (asynchronously)."""
        slot = g % STAGES
        mbarrier.wait(bars.index(slot), (g // STAGES) & 1)
        return warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot).permute((1, 0)), init, use_acc=False,
                             is_async=True)

    @gluon.jit
    def _refill(a_desc, b_desc, a_bufs, b_bufs, bars, off_m, off_n, g, n_k, STAGES: gl.constexpr,
                nbytes: gl.constexpr):
        """Group g's dot has finished: load group g + STAGES into its slot (if there is one)."""
        slot = g % STAGES
        k = (g + STAGES) * a_desc.block_type.shape[1]
        ok = g + STAGES < n_k
        mbarrier.expect(bars.index(slot), nbytes, pred=ok)
        tma_load(a_desc, [off_m, k], bars.index(slot), a_bufs.index(slot), pred=ok)
        tma_load(b_desc, [off_n, k], bars.index(slot), b_bufs.index(slot), pred=ok)

    @gluon.jit
    def _scales(as_ptrs, bs_ptrs, mask_m, g, stride_ask, stride_bsk):
        """x_scale[m, g] * w_scale[n-block, g] for the tile's rows (loaded a group ahead of use)."""
        return gl.load(as_ptrs + g * stride_ask, mask=mask_m, other=0.0) * gl.load(bs_ptrs + g * stride_bsk)

    @gluon.jit
    def _accumulate(acc, d, s):
        """acc + float(dot) * scale: the dot's bits read as 1.5 * 2^23 + dot (module docstring)."""
        return acc + ((d + 0x4B400000).to(gl.float32, bitcast=True) - 12582912.0) * s[:, None]


if HAVE_GLUON:
    @gluon.jit
    def _block_kernel(a_desc, b_desc, as_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
                      stride_asm, stride_ask, stride_bsn, stride_bsk, stride_cm, stride_cn,
                      HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                      UNROLL: gl.constexpr, num_warps: gl.constexpr):
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]

        # tiles of GROUP_M row-blocks walked column by column (L2 reuse), as in the Triton kernel
        pid = gl.program_id(0)
        grid_m = gl.cdiv(M, BLOCK_M)
        grid_n = gl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * grid_n
        first_m = (pid // per_group) * GROUP_M
        rows = gl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_N, 32])
        rows_l: gl.constexpr = gl.SliceLayout(1, mma)
        cols_l: gl.constexpr = gl.SliceLayout(0, mma)
        offs_m = off_m + gl.arange(0, BLOCK_M, layout=rows_l)
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=cols_l)
        mask_m = offs_m < M
        as_ptrs = as_ptr + offs_m * stride_asm
        bs_ptrs = bs_ptr + (off_n // BK) * stride_bsn  # BLOCK_N divides the weight block

        a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BK], b_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(bars.index(s), count=1)
        fence_async_shared()
        nbytes: gl.constexpr = (BLOCK_M + BLOCK_N) * BK

        n_k = K // BK
        for s in gl.static_range(STAGES):  # fill the ring
            ok = s < n_k
            mbarrier.expect(bars.index(s), nbytes, pred=ok)
            tma_load(a_desc, [off_m, s * BK], bars.index(s), a_bufs.index(s), pred=ok)
            tma_load(b_desc, [off_n, s * BK], bars.index(s), b_bufs.index(s), pred=ok)

        init = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=mma)  # not read (use_acc=False)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)

        # UNROLL groups per loop step, unrolled at compile time: group u's dot runs while group u-1's
        # is scaled. Every dot is waited for inside its step, because a dot still in flight across
        # the loop's back edge (or into the loop) gets its accumulator copied by the phi moves, and
        # ptxas then serialises every wgmma of the kernel (warning C7514).
        n_main = n_k - n_k % UNROLL
        for g0 in range(0, n_main, UNROLL):
            tok = _issue(a_bufs, b_bufs, bars, init, g0, STAGES)
            sc = _scales(as_ptrs, bs_ptrs, mask_m, g0, stride_ask, stride_bsk)
            for u in gl.static_range(1, UNROLL):
                nxt = _issue(a_bufs, b_bufs, bars, init, g0 + u, STAGES)
                sc_nxt = _scales(as_ptrs, bs_ptrs, mask_m, g0 + u, stride_ask, stride_bsk)
                d = warpgroup_mma_wait(num_outstanding=1, deps=(tok, ))
                _refill(a_desc, b_desc, a_bufs, b_bufs, bars, off_m, off_n, g0 + u - 1, n_k, STAGES, nbytes)
                acc = _accumulate(acc, d, sc)
                tok = nxt
                sc = sc_nxt
            d = warpgroup_mma_wait(num_outstanding=0, deps=(tok, ))
            _refill(a_desc, b_desc, a_bufs, b_bufs, bars, off_m, off_n, g0 + UNROLL - 1, n_k, STAGES, nbytes)
            acc = _accumulate(acc, d, sc)
        for g in range(n_main, n_k):  # the rest, one group at a time
            tok = _issue(a_bufs, b_bufs, bars, init, g, STAGES)
            sc = _scales(as_ptrs, bs_ptrs, mask_m, g, stride_ask, stride_bsk)
            d = warpgroup_mma_wait(num_outstanding=0, deps=(tok, ))
            _refill(a_desc, b_desc, a_bufs, b_bufs, bars, off_m, off_n, g, n_k, STAGES, nbytes)
            acc = _accumulate(acc, d, sc)
        for s in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(s))

        if HAS_BIAS:
            acc = acc + gl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(gl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        gl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_n < N)[None, :])


def descriptors(xq: torch.Tensor, wq: torch.Tensor, block_m: int, block_n: int):
    """TMA descriptors of the activation and weight operands (tiles BLOCK_M x 128, BLOCK_N x 128)."""
    a_layout = gl.NVMMASharedLayout.get_default_for([block_m, BLOCK_K], gl.int8)
    b_layout = gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], gl.int8)
    return (TensorDescriptor(xq, list(xq.shape), [xq.stride(0), 1], [block_m, BLOCK_K], a_layout),
            TensorDescriptor(wq, list(wq.shape), [wq.stride(0), 1], [block_n, BLOCK_K], b_layout))


def kernel_args(xq, xs, wq, ws, bias, c, config=DEFAULT_CONFIG):
    """(grid, positional args, keyword args) of one launch; also used to compile without a GPU."""
    block_m, block_n, warps, stages, group_m, unroll = config
    m, k = xq.shape
    n = wq.shape[0]
    a_desc, b_desc = descriptors(xq, wq, block_m, block_n)
    args = (a_desc, b_desc, xs, ws, bias if bias is not None else c, c, m, n, k,
            xs.stride(0), xs.stride(1), ws.stride(0), ws.stride(1), c.stride(0), c.stride(1))
    kw = dict(HAS_BIAS=bias is not None, GROUP_M=group_m, STAGES=stages, UNROLL=unroll, num_warps=warps)
    return (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),), args, kw


def w8a8_block_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype,
                      config: tuple[int, ...] = DEFAULT_CONFIG) -> torch.Tensor:
    """``xq`` [M, K] int8, ``xs`` [M, K/128] fp32, ``wq`` [N, K] int8, ``ws`` [N/128, K/128] fp32
    (:func:`usable` must hold). ``config``: (BLOCK_M, BLOCK_N, num_warps, STAGES, GROUP_M,
    UNROLL); BLOCK_N divides 128, BLOCK_M = 16 * num_warps * i."""
    c = torch.empty((xq.shape[0], wq.shape[0]), dtype=out_dtype, device=xq.device)
    grid, args, kw = kernel_args(xq, xs, wq, ws, bias, c, config)
    _block_kernel[grid](*args, **kw)
    return c


_choice: dict[tuple, tuple[int, ...] | None] = {}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def tuned_block_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype,
                       other: Callable[[], torch.Tensor]) -> torch.Tensor:
    """:func:`w8a8_block_matmul` with the fastest of :data:`CONFIGS`, or ``other()`` (the Triton
    kernel, same result up to fp32 rounding order) where that was faster: timed on the first call
    of each (M, N, K, output dtype, bias, device), like Triton's autotuner. If the Gluon kernel
    fails to build (another Triton's Gluon API), ``other()`` is used, with one warning."""
    key = (xq.shape[0], wq.shape[0], xq.shape[1], out_dtype, bias is None, xq.device.index)
    if key not in _choice:
        # Triton's autotuner's budget (25 ms warm-up, 100 ms timed): with 5 ms / 20 ms the pick at
        # 3072 x 12288 was a config 4% slower than the best (benchmarks/bench_gluon_w8a8.py, H100)
        timed = {None: triton.testing.do_bench(other, warmup=25, rep=100)}
        for cfg in CONFIGS:
            try:
                timed[cfg] = triton.testing.do_bench(
                    lambda cfg=cfg: w8a8_block_matmul(xq, xs, wq, ws, bias, out_dtype, cfg), warmup=25, rep=100)
            except Exception as e:  # a Triton whose Gluon API differs (tested: 3.6 and 3.9): keep Triton's
                _warn_once(f"quantkit: the Gluon int8-block kernel did not build here ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); using the Triton kernel")
                break
        _choice[key] = min(timed, key=timed.get)
    cfg = _choice[key]
    return other() if cfg is None else w8a8_block_matmul(xq, xs, wq, ws, bias, out_dtype, cfg)
