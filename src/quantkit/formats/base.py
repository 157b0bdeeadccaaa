"""What every on-disk format implements, and the registry formats join by being defined.

A format owns everything about itself: its ``--format`` name and ``.comfy_quant`` string, the
tensors one layer writes (suffix, dtype, shape, in writing order), the shapes it can take, the
torch reference quantize / dequantize (the numerical spec), its marker keys, and the contract
checks ``inspect`` / ``verify`` run on a layer of any tool's file. Planning, the writer, the
reader-side tools, the runtime and the node ask the registry and never name a format.

Nothing here imports torch: format names, summaries and choices are known without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

DEFAULT_BLOCK_SIZE = 128

# Fast quantizer families the backends implement (native C, Triton, chunked torch). A format whose
# ``kernel`` is one of these is quantized by them; ``None``: by its own torch ``quantize`` only.
SCALED = "scaled"  # one fp32 multiplier per tensor / row / b x b tile, q = round-or-cast(w / scale)


@dataclass(frozen=True)
class LayerOpts:
    """The per-layer options a format may read (each names the ones it reads in ``option_names``).
    A format needing a new option adds a field here, with a default that changes no other format."""

    block_size: int = DEFAULT_BLOCK_SIZE
    convrot_group_size: int = 256  # int8-convrot: the ConvRot group G wanted (a layer may take a smaller one)
    # Set by convert, never by the user: calibration gave this layer a static input_scale (its format's
    # :meth:`Format.static_input_scale` is not None), so a format that stores one only then (nvfp4) plans it.
    static_input_scale: bool = False


class Stored(NamedTuple):
    """One tensor a quantized layer ``L`` writes, as ``L.<suffix>``."""

    suffix: str  # "weight", "weight_scale", "input_scale", ...
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Violation:
    """A way a file breaks the on-disk contract (../shared/comfy-contract.md)."""

    rule: str  # short stable id, e.g. "scale-without-marker"
    tensor: str | None
    message: str

    def line(self) -> str:
        return f"{self.tensor}: {self.message} [{self.rule}]" if self.tensor else f"{self.message} [{self.rule}]"


def dtype_str(dtype: Any) -> str:
    """``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"`` (the marker's ``orig_dtype``)."""
    return str(dtype).removeprefix("torch.")


def roundup(x: int, m: int) -> int:
    return -(-x // m) * m


def padded_2d(shape: tuple[int, int], pad: int) -> tuple[int, int]:
    """[N, K] rounded up to whole ``pad``-multiples in both dimensions (the stored weight's shape)."""
    return roundup(shape[0], pad), roundup(shape[1], pad)


def blocked_scale_shape(padded: tuple[int, int], block: int) -> tuple[int, int]:
    """The swizzled block-scale tensor of a padded [Np, Kp] weight with 1 x ``block`` blocks:
    [roundup(Np, 128), roundup(Kp / block, 4)] (the cuBLAS blocked layout, ``_blocked.py``)."""
    return roundup(padded[0], 128), roundup(padded[1] // block, 4)


def shape_reason(shape: tuple[int, ...]) -> str | None:
    """Why a weight of ``shape`` is no quantizable matrix (None if it is a non-empty 2-D one)."""
    if len(shape) != 2:
        return f"{len(shape)}-D weight, format needs 2-D"
    if shape[0] == 0 or shape[1] == 0:
        return f"empty weight {tuple(shape)}"
    return None


def plain_marker(comfy_format: str, shape: tuple[int, ...], orig_dtype: Any) -> dict:
    """A ``.comfy_quant`` marker of just the format string and the original dtype and shape."""
    return {"format": comfy_format, "orig_dtype": dtype_str(orig_dtype), "orig_shape": [int(s) for s in shape]}


class LearnGrid:
    """What a format gives learned rounding (:func:`quantkit.learned.learn_format`): its real grid
    for one weight. The error-feedback loop runs over the columns of :attr:`w` and never names a
    format; the format rounds, chooses its scales and assembles its own tensors.

    * :attr:`w` fp32 [N, K]: the weight in the basis the objective is taken in (ConvRot: W rotated
      as the format's quantizer rotates it), :attr:`h` fp32 [K, K]: the objective matrix in that
      basis (ConvRot: R^T H R). The loop's squared error in that basis is the layer's output error.
    * :attr:`block`: columns that share one choice of scales, chosen by :meth:`choose` from the
      error-updated weights when the loop reaches the block's first column (columns then go in
      natural order; a multiple of 16 dividing 128); 0: the scales are fixed when the grid is made
      and columns may go in any order.
    * :meth:`round`: column ``j`` (index in :attr:`w`) to the grid with those scales; returns its
      dequantized value in the basis (fp32 [N]) and remembers the codes.
    * :meth:`stored`: the layer's tensors from the codes and scales (suffix -> tensor), which the
      format's ``dequantize`` reads like its own quantizer's.
    * optional ``fused_block(w, u, i1, i2)``: columns i1 .. i2 of the loop (choose, round, the
      in-block error feedback under the upper factor ``u``) in one GPU launch, the loop's arithmetic
      exactly; returns the block's scaled errors [N, i2 - i1] (w4a8:
      :mod:`quantkit.kernels.triton_w4a8_gptq`). ``learned.gptq_grid`` uses it on CUDA.
    """

    w: Any
    h: Any
    block: int = 0
    method: str = "gptq"  # what the report says the scales came from

    def choose(self, j0: int, cols) -> None:
        """Choose the scales of the block starting at column ``j0`` from ``cols`` fp32 [N, <= block]."""

    def round(self, j: int, col) -> Any:
        raise NotImplementedError

    def stored(self) -> dict:
        raise NotImplementedError


class Format:
    """Base class of an on-disk format. Subclasses set the class attributes and implement the
    methods; an instance joins :data:`FORMATS` through :func:`register`."""

    name: str  # the --format value
    comfy_format: str  # the "format" string in .comfy_quant
    summary: str  # one line for `quantkit formats`
    stock_comfy: bool  # loads in unmodified ComfyUI
    option_names: tuple[str, ...] = ()  # the LayerOpts fields this format reads
    fallback: bool = False  # takes every 2-D weight, so it can be --fallback
    kernel: str | None = None  # a fast quantizer family (SCALED), or None
    runtime_layout: str | None = None  # the runtime / ComfyUI layout class that holds its weights
    node_target: str | None = None  # the name the ComfyUI quantize node offers it under
    weight_dtype_name: str = ""  # safetensors dtype of the stored weight ("I8", "F8_E4M3", "U8", ...)
    native: str | None = None  # a format without a kernel: its C kernel in quantkit.kernels.native_blocks
    triton: str | None = None  # ... and its Triton quantizer in quantkit.kernels.triton_blocks (CUDA)
    # the optional per-input-channel activation multiplier ComfyUI's loader takes for this format (a
    # float [K] tensor L.<suffix>; its forward runs x * it, in x's dtype, before everything else), or None.
    # quantkit reads it in other producers' files (the layer's weight is then W'[:, k] * it[k]) and runs
    # it in the runtime; it never writes one (see formats/nvfp4.py)
    input_smoothing: str | None = None

    def quantize_native(self, w, opts: LayerOpts, out=None):
        """For a format with ``native``: (stored tensors, ErrorStats) from its C kernel, the bytes
        of :meth:`quantize` (``quantkit.backend.quantize_stored`` calls it where the kernel runs).
        ``out``: a uint8 buffer of at least the weight's bytes that the weight is written into, or None."""
        from ..kernels import native_blocks
        return getattr(native_blocks, self.native)(w, out=out)

    @property
    def weight_dtype(self):
        """The torch dtype of the stored weight (ComfyUI's ``storage_t``)."""
        from ..dtypes import torch_dtype
        return torch_dtype(self.weight_dtype_name)

    # ---- planning ----
    def option_error(self, opts: LayerOpts) -> tuple[str, str] | None:
        """(problem, fix) when ``opts`` are not valid for this format, else None."""
        return None

    def cannot_take(self, shape: tuple[int, ...], opts: LayerOpts) -> str | None:
        """Why a weight of this shape cannot be stored in this format, or None if it can."""
        raise NotImplementedError

    def plan_note(self, shape: tuple[int, ...], opts: LayerOpts) -> str:
        """What the plan says about a layer this format takes, when the layer differs from what was
        asked (int8-convrot: a smaller group size where the asked one does not divide K); "" else."""
        return ""

    def stored(self, shape: tuple[int, ...], orig_dtype: Any, opts: LayerOpts) -> list[Stored]:
        """The tensors one layer writes besides its marker, in writing order (``weight`` first), for
        a weight of ``shape`` in ``orig_dtype`` (a format may store scales in the weight's dtype)."""
        raise NotImplementedError

    def marker(self, shape: tuple[int, ...], orig_dtype: Any, opts: LayerOpts) -> dict:
        """The layer's ``.comfy_quant`` object (before user-set keys such as full_precision_matrix_mult)."""
        raise NotImplementedError

    def layer_tensors(self, layer: str, shape: tuple[int, ...], orig_dtype: Any, opts: LayerOpts,
                      extra: dict | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
        """Every tensor the layer writes, marker last: (name, dtype, shape) in writing order."""
        from . import encode_comfy_quant
        m = {**self.marker(shape, orig_dtype, opts), **(extra or {})}
        return [(f"{layer}.{s.suffix}", s.dtype, tuple(s.shape)) for s in self.stored(shape, orig_dtype, opts)] + \
            [(f"{layer}.comfy_quant", "U8", (len(encode_comfy_quant(m)),))]

    def describe(self) -> tuple[str, str]:
        """(weight, scales) as `quantkit formats` lists them, e.g. ("I8", "fp32 [N,1]")."""
        raise NotImplementedError

    # ---- numbers: the torch reference ----
    def quantize(self, w, opts: LayerOpts) -> dict:
        """The stored tensors of weight ``w`` (suffix -> tensor), exactly those of :meth:`stored`:
        the numerical spec every fast path is tested against bit for bit."""
        raise NotImplementedError

    def dequantize(self, tensors: dict, marker: dict, dtype, layer: str = "") -> Any:
        """What ComfyUI computes from a layer's stored tensors (suffix -> tensor), in compute dtype
        ``dtype``, bit for bit. Raises QuantkitError naming ``layer``'s tensor when they do not fit
        the marker."""
        raise NotImplementedError

    def pack(self, q, scale) -> dict:
        """For a format with a ``kernel``: its stored tensors from the kernel's (q, scale)."""
        raise NotImplementedError

    def learn_grid(self, w, h, opts: LayerOpts, rtn: dict | None = None) -> LearnGrid | None:
        """The format's grid for learned rounding of weight ``w`` (fp32) under objective matrix ``h``
        (E[x x^T] or the covariance, [K, K]); ``rtn``: the format's own quantizer's tensors of ``w``
        when the caller has them (a grid may start from their scales instead of searching again).
        None: learned rounding does not run this format."""
        return None

    def static_input_scale(self, stats: dict) -> Any:
        """The ``input_scale`` tensor calibration statistics give (``absmax``, ``mean``, ...: see
        :mod:`quantkit.calibration`), for a format that stores one; None keeps the planned value."""
        return None

    # ---- reading files (any tool's) ----
    def recognizes(self, marker: dict, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether a layer read from a file (its marker, its tensors' shapes by suffix) is this
        format. Several formats may share one comfy string; these tell them apart."""
        return marker.get("format") == self.comfy_format

    def orig_shape(self, marker: dict, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
        """The shape of the weight before quantizing (padded formats store another)."""
        return tuple(shapes["weight"])

    def check(self, layer: str, marker: dict, T: dict) -> list[Violation]:
        """Contract violations of layer ``layer`` whose marker names this comfy string; ``T``: the
        file's tensor name -> TensorInfo (dtype, shape, numel). The weight is known to exist."""
        return []

    def __repr__(self) -> str:
        return f"<format {self.name}>"


FORMATS: dict[str, Format] = {}  # --format name -> format, in registration order


def register(fmt: Format) -> Format:
    """Add ``fmt`` to :data:`FORMATS` (a name registers once); returns it."""
    if fmt.name in FORMATS:
        raise ValueError(f"format '{fmt.name}' is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def unregister(name: str) -> None:
    """Remove a format (for tests that register one of their own)."""
    del FORMATS[name]
