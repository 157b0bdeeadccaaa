"""What the converter calls, per layer, when calibration, learned rounding or bias correction is on.

One object per conversion (:class:`Refiner`), built after planning. The converter asks it three
things, each at one place in ``convert._convert_one``:

* ``quantize(lp)`` -> (q, scale, note) for a quantized layer: learned rounding when asked for
  (objective from the layer's calibration statistics; refused without them), else round-to-nearest;
* ``input_scale(lp)`` -> the static ``input_scale`` from calibration (the format's rule: fp8 max |x| / qmax, nvfp4
  max |x| / (448 * 6)), or None; ``static_input_layers()`` -> the layers the plan lists one for;
* ``bias(lp)`` -> the corrected bias of a quantized layer, b + (W - Wq) mu, in the bias's dtype and shape.

A layer's learned result is cached from the first of its weight and its bias to be written until
both are, so it is computed once whatever the file order. ``precomputed`` (set by
:mod:`quantkit.multi`) serves results computed beforehand in worker processes; :meth:`learned_layers`
lists the layers it has to cover.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import learned
from .backend import has_kernel
from .formats.base import Format
from .formats import scaled
from .calibration import Calibration, match_layers
from .errors import QuantkitError, UsageError
from .plan import LayerPlan, Plan
from .safetensors_io import SafetensorsReader


@dataclass
class Refiner:
    reader: SafetensorsReader
    plan: Plan
    learned_rounding: bool = False
    calibration: Calibration | None = None
    bias_correction: bool = False
    options: learned.LearnedOptions = learned.LearnedOptions()
    calibration_path: str | None = None
    _stats: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _layers: dict[str, LayerPlan] = field(default_factory=dict)
    _cache: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = field(default_factory=dict)
    _pending: dict[str, set[str]] = field(default_factory=dict)
    _stat_names: dict[str, str] = field(default_factory=dict)
    precomputed: Callable[[str], tuple[torch.Tensor, torch.Tensor, str] | None] | None = None

    @classmethod
    def create(cls, reader: SafetensorsReader, plan: Plan, *, learned_rounding: bool = False,
               calibration: str | Path | Calibration | None = None, bias_correction: bool = False,
               options: learned.LearnedOptions | None = None) -> Refiner | None:
        """None when nothing beyond round-to-nearest was asked for."""
        if bias_correction and calibration is None:
            raise UsageError("--bias-correction needs --calibration: the correction is (W - Wq) times the "
                             "mean real input, and random zero-mean inputs would make it exactly zero",
                             fix="capture statistics with quantkit.calibration.capture and pass --calibration")
        if learned_rounding and (options or learned.LearnedOptions()).objective not in ("calibration", "subspace"):
            raise UsageError(f"learned-rounding objective '{options.objective}' is not 'calibration' or 'subspace'")
        subspace = learned_rounding and options is not None and options.objective == "subspace"
        if learned_rounding and calibration is None and not subspace:
            raise UsageError("--learned-rounding needs --calibration: without real inputs the only objective is a "
                             "data-free proxy (H = W^T W), and it raised held-out output error above round-to-nearest "
                             "(all-MiniLM-L6-v2: median 1.06-1.11x, worst 1.64x; see DEVELOPMENT.md)",
                             fix="capture statistics with quantkit.calibration.capture and pass --calibration, "
                                 "or drop --learned-rounding (--learned-objective subspace is data-free but "
                                 "neutral on real inputs)")
        if not (learned_rounding or calibration is not None or bias_correction):
            return None
        path = None
        if calibration is not None and not isinstance(calibration, Calibration):
            path = str(calibration)
            calibration = Calibration.load(calibration)
        r = cls(reader, plan, learned_rounding, calibration, bias_correction, options or learned.LearnedOptions(),
                path)
        r._layers = {lp.layer: lp for lp in plan.quantized}
        if calibration is not None:
            # Match against every weight in the file, so statistics of layers this plan keeps
            # unquantized (a preset's rule, --exclude) are ignored rather than reported as unmatched.
            weights = {lp.layer for lp in plan.layers if lp.tensor.endswith(".weight") and len(lp.shape) == 2}
            m = {L: s for L, s in match_layers(weights | set(r._layers), calibration, file=path).items()
                 if L in r._layers}
            missing = [L for L in r._layers if L not in m]
            if missing:
                raise QuantkitError(f"no calibration statistics for layer '{missing[0]}' "
                                    f"({len(missing)} quantized layers lack them)", file=path,
                                    fix=f"capture over the whole model, or keep it with --exclude '^{missing[0]}$'")
            r._stats = {L: calibration.layers[s] for L, s in m.items()}
            r._stat_names = dict(m)
            for L, st in r._stats.items():
                if learned_rounding and float(st["count"]) > 0 and "hessian" not in st and \
                        calibration.second_order == "full":
                    raise QuantkitError("calibration layer lacks its 'hessian'", file=path, tensor=L,
                                        fix="recreate the file with quantkit.calibration.capture")
        return r

    def _seen(self, layer: str) -> bool:
        return float(self._stats.get(layer, {}).get("count", 0.0)) > 0

    def learned_layers(self) -> list[tuple[LayerPlan, str, bool]]:
        """The layers of the scaled grids learned rounding runs on (what ``--devices`` workers compute):
        (plan, calibration layer name, whether the objective is the bias-corrected covariance), in plan
        order. Empty without learned rounding. Layers of a format giving its own grid are learned in
        the converting process (:meth:`_result`)."""
        if not self.learned_rounding or self.calibration is None:
            return []
        return [(lp, self._stat_names[L], self._corrects_bias(L)) for L, lp in self._layers.items()
                if self._seen(L) and has_kernel(lp.spec) and not self._lacks_hessian(L)]

    def _corrects_bias(self, layer: str) -> bool:
        """Bias correction applies to this quantized layer: it ran during calibration and has a
        1-D bias of its output size (the objective is then the covariance)."""
        wlp = self._layers.get(layer)
        t = self.reader.tensors.get(f"{layer}.bias")
        return (self.bias_correction and wlp is not None and t is not None and self._seen(layer)
                and tuple(t.shape) == (wlp.shape[0],) and learnable(wlp.spec))

    @property
    def device(self) -> torch.device:
        return learned.pick_device(self.options.device)

    def rewrites(self, lp: LayerPlan) -> bool:
        """Whether learned rounding chooses this layer's weight (else it is round-to-nearest, which the
        converter's own quantizer writes, with :meth:`input_scale` and :meth:`note` from here)."""
        if not self.learned_rounding or lp.spec is None or not learnable(lp.spec):
            return False  # learned rounding works on the scaled grids and on formats giving their grid
        if not has_kernel(lp.spec) and self.options.objective != "calibration":
            return False  # the data-free subspace objective runs on the scaled grids only
        return self.options.objective == "subspace" or (self.calibration is not None and self._seen(lp.layer)
                                                         and not self._lacks_hessian(lp.layer))

    def _lacks_hessian(self, layer: str) -> bool:
        """A file captured with hessians for some layers only ('mixed'): the others keep RTN (a
        diagonal H gives error feedback nothing to feed, and minus mu mu^T it is not even PSD)."""
        return (self.calibration is not None and self.calibration.second_order == "mixed"
                and "hessian" not in self._stats.get(layer, {}))

    def note(self, lp: LayerPlan) -> str:
        """What the report says about a layer this refiner leaves at round-to-nearest."""
        if self.learned_rounding and self.calibration is not None and not self._seen(lp.layer):
            return "rtn: layer never ran during calibration"
        if self.learned_rounding and self._lacks_hessian(lp.layer):
            return "rtn: no hessian for this layer in the calibration file"
        return ""

    def _result(self, lp: LayerPlan) -> tuple[torch.Tensor, torch.Tensor, str]:
        L = lp.layer
        if L in self._cache:
            return self._cache[L]
        if self.precomputed is not None and (got := self.precomputed(L)) is not None:
            self._store(lp, got)
            return got
        spec, b = lp.spec, lp.block_size  # a config entry may set its own
        assert spec is not None
        w = self.reader.tensor(lp.tensor)
        if not has_kernel(spec):  # a registry format's own grid: its stored tensors, scale None
            if self.rewrites(lp):
                r = learned.learn_format(w, learned.objective_matrix(self._stats[L], self._corrects_bias(L)), spec,
                                         lp.opts, self.options, name=L, orig_dtype=w.dtype)
                out = (r.stored, None, r.note)
            else:  # round-to-nearest (the format's own quantizer), needed here only for a corrected bias
                out = (spec.quantize(w, lp.opts), None, "")
        elif self.rewrites(lp):
            if self.options.objective == "subspace":
                r = learned.learn_subspace(w, spec, b, self.options, name=L)
            else:
                r = learned.learn(w, learned.objective_matrix(self._stats[L], self._corrects_bias(L)), spec, b,
                                  self.options, name=L)
            out = (r.q, r.scale, r.note)
        else:  # round-to-nearest, needed here only for a corrected bias
            q, scale = scaled.quantize(w, spec, b)
            out = (q, scale, "")
        self._store(lp, out)
        return out

    def _store(self, lp: LayerPlan, out: tuple[torch.Tensor, torch.Tensor, str]) -> None:
        layer = lp.layer
        users = {"weight"} if self.rewrites(lp) else set()
        if self._corrects_bias(layer):
            users.add("bias")
        if not users:
            return
        self._cache[layer] = out
        self._pending[layer] = users

    def _done(self, layer: str, user: str) -> None:
        users = self._pending.get(layer)
        if users is not None:
            users.discard(user)
            if not users:
                self._cache.pop(layer, None)
                self._pending.pop(layer, None)

    def quantize(self, lp: LayerPlan) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(q, scale, note) for a quantized layer; ``note`` says what learned rounding did."""
        out = self._result(lp)
        self._done(lp.layer, "weight")
        return out

    def static_input_layers(self) -> set[str]:
        """The quantized layers whose format takes a static input_scale from their statistics (inputs
        were seen): the plan lists it for them (:func:`quantkit.plan.with_static_input_scales`)."""
        return {L for L, lp in self._layers.items() if lp.spec is not None and self._seen(L)
                and learned.static_input_scale(self._stats[L], lp.spec) is not None}

    def input_scale(self, lp: LayerPlan) -> torch.Tensor | None:
        spec = lp.spec
        if spec is None or not self._seen(lp.layer):
            return None
        return learned.static_input_scale(self._stats[lp.layer], spec)

    def bias(self, lp: LayerPlan) -> torch.Tensor | None:
        """The corrected bias when ``lp`` is the bias of a quantized layer under bias correction."""
        if not self.bias_correction or not lp.tensor.endswith(".bias"):
            return None
        L = lp.tensor.removesuffix(".bias")
        if not self._corrects_bias(L):
            return None
        wlp = self._layers[L]
        q, scale, _ = self._result(wlp)
        dev = self.device  # whole-tensor fp64 work: on the learning device, not CPU cores
        w = self.reader.tensor(wlp.tensor).to(dev)
        if scale is None:  # a registry format's stored tensors
            deq = wlp.spec.dequantize(q, wlp.comfy_quant(), torch.float32, L).to(dev)
        else:
            deq = scaled.dequantize(q.to(dev), scale.to(dev), wlp.spec, wlp.block_size, torch.float32)
        b = learned.corrected_bias(self.reader.tensor(lp.tensor).to(dev), w, deq, self._stats[L]["mean"].to(dev))
        self._done(L, "bias")
        return b.cpu()


def learnable(spec) -> bool:
    """Whether learned rounding runs this format: a scaled grid (the fast kernels' family) or a
    registry format that gives its own grid (:meth:`quantkit.formats.base.Format.learn_grid`)."""
    return spec is not None and (has_kernel(spec) or type(spec).learn_grid is not Format.learn_grid)
