"""What the runtime's Triton GEMMs (:mod:`.triton_w8a8`, :mod:`.triton_w4`) share: the order in which
a one-dimensional grid of programs walks the output tiles, and the launch with an explicit config
(the interpreter, a sweep) or through the kernel's autotuner."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def swizzle(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (pid_m, pid_n): tiles of GROUP_M row blocks walked column by column (L2 reuse)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m, pid_n


def launch(kernel, tuned, args, meta: dict, m: int, n: int, config: dict | None) -> None:
    """``kernel`` over an [m, n] output with ``config`` (BLOCK_M, BLOCK_N, ... and optionally num_warps,
    num_stages), or ``tuned`` (the autotuned kernel) when config is None."""
    if config is not None:
        config = dict(config)
        kw = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        kernel[grid](*args, **config, **meta, **kw)
    else:
        def grid(cfg):
            return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        tuned[grid](*args, **meta)
