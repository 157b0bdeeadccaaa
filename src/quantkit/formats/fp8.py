"""FP8 with one fp32 scale per tensor: ``fp8`` (E4M3, ``float8_e4m3fn``) and ``fp8-e5m2``
(``float8_e5m2``). Stock ComfyUI loads both; L.input_scale (fp32 scalar, 1.0 unless calibrated)
is written because the loader reads it."""

from __future__ import annotations

from .base import Violation, register
from .scaled import ScaledFormat


def is_scalar(t) -> bool:
    return t.numel == 1 and len(t.shape) <= 1


class Fp8Format(ScaledFormat):
    granularity = "tensor"
    fallback = True

    def check(self, layer: str, marker: dict, T: dict) -> list[Violation]:
        fmt, out = self.comfy_format, []
        w, s = T[f"{layer}.weight"], T.get(f"{layer}.weight_scale")
        if w.dtype == "U8":
            out.append(Violation("uint8-stored-fp8", w.name, f"{fmt} weight stored as U8: the loader converts by "
                                 f"value, so every weight becomes garbage (store it as {self.weight_dtype_name})"))
        elif w.dtype != self.weight_dtype_name:
            out.append(Violation("wrong-weight-dtype", w.name, f"{fmt} weight is {w.dtype}, must be {self.weight_dtype_name}"))
        if len(w.shape) != 2:
            return out + [Violation("wrong-weight-shape", w.name,
                                    f"quantized weight is {len(w.shape)}-D {list(w.shape)}; must be 2-D")]
        orig = marker.get("orig_shape")
        if orig is not None and list(orig) != list(w.shape):
            out.append(Violation("orig-shape-mismatch", f"{layer}.comfy_quant",
                                 f"orig_shape {orig} but the weight is {list(w.shape)}"))
        if s is None:
            return out + [Violation("missing-scale", w.name, f"{fmt} needs {layer}.weight_scale; ComfyUI crashes "
                                    "at the layer's first use")]
        if s.dtype != "F32":
            out.append(Violation("wrong-scale-dtype", s.name, f"{fmt} scale is {s.dtype}, must be F32"))
        if not is_scalar(s):
            out.append(Violation("wrong-scale-shape", s.name, f"{fmt} takes one scalar scale [], not {list(s.shape)}"))
        i = T.get(f"{layer}.input_scale")
        if i is not None and (i.dtype != "F32" or not is_scalar(i)):
            out.append(Violation("wrong-scale-shape", i.name,
                                 f"input_scale must be an F32 scalar, not {i.dtype} {list(i.shape)}"))
        return out


FP8 = register(Fp8Format("fp8", "float8_e4m3fn", "F8_E4M3", 448.0, "FP8 E4M3, one fp32 scale per tensor",
                         stock_comfy=True, writes_input_scale=True, runtime_layout="TensorCoreFP8E4M3Layout",
                         node_target="fp8_e4m3fn", static_input=True))
FP8_E5M2 = register(Fp8Format("fp8-e5m2", "float8_e5m2", "F8_E5M2", 57344.0, "FP8 E5M2, one fp32 scale per tensor",
                              stock_comfy=True, writes_input_scale=True, runtime_layout="TensorCoreFP8E5M2Layout",
                              node_target="fp8_e5m2"))
