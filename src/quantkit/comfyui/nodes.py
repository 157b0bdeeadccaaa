"""The node classes, in ComfyUI's class convention (``nodes.py``): ``INPUT_TYPES`` classmethod,
``RETURN_TYPES``, ``FUNCTION``, ``CATEGORY``; the function returns a tuple.

* :class:`QuantkitQuantizeModel` -- MODEL in, quantized MODEL clone out (:mod:`.quantize_model`)
* :class:`QuantkitConvertCheckpoint` -- converts a .safetensors file from ComfyUI's model folders
  with :func:`quantkit.convert`, writing beside the source, progress on ComfyUI's progress bar
  (optionally with a stats file from models/calibration: input_scale, learned rounding, bias correction)
* Capture / Save Calibration (:mod:`.capture_nodes`), Compare Models (:mod:`.compare_node`)

ComfyUI's ``folder_paths``, ``comfy.utils`` and ``comfy.model_management`` are imported when a node
runs or lists its inputs, never at import time.
"""

from __future__ import annotations

import importlib
import logging
import os
import re

from .. import families
from ..convert import convert
from ..errors import QuantkitError
from ..formats import DEFAULT_BLOCK_SIZE, DEFAULT_FALLBACK, DEFAULT_FORMAT, FALLBACK_CHOICES, FORMATS, LayerOpts
from ..plan import default_output_name
from .capture_nodes import FOLDER, QuantkitCaptureCalibration, QuantkitSaveCalibration, calibration_files, register_folder
from .compare_node import QuantkitCompareModels
from .quantize_model import TARGETS, format_options, quantize_model

log = logging.getLogger("quantkit.comfyui")

CATEGORY = "quantkit"
# Folders the convert node reads from (ComfyUI's folder_paths names).
SOURCE_FOLDERS = ("diffusion_models", "checkpoints", "text_encoders")
PRESET_TIP = "model family whose high-precision layers stay unquantized (auto: detect; none: generic rules)"
CONVROT_INPUT = ("INT", {"default": LayerOpts.convrot_group_size, "min": 4, "max": 4096,
                         "tooltip": "int8-convrot's ConvRot group: a power of 4 (16, 64, 256, 1024); a layer whose "
                                    "in_features it does not divide takes the largest power of 4 that does "
                                    "(the 4-bit formats pick their group per layer)"})


def _split_patterns(text: str) -> tuple[str, ...]:
    """One regex per line (blank lines ignored), as the ``exclude`` text box takes them."""
    return tuple(line.strip() for line in (text or "").splitlines() if line.strip())


class QuantkitQuantizeModel:
    """Quantize a loaded model's linear layers; the input MODEL is left as it was."""

    DESCRIPTION = ("Quantizes the linear layers of a MODEL with quantkit (the same bits `quantkit convert` "
                   "writes) and returns a clone; the input MODEL is not modified. Norms, embeddings and "
                   "excluded layers stay in high precision.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "target": (list(TARGETS), {"default": FORMATS[DEFAULT_FORMAT].node_target}),
                "block_size": ("INT", {"default": DEFAULT_BLOCK_SIZE, "min": 16, "max": 1024, "step": 16,
                                       "tooltip": "tile size of the block formats (power of two)"}),
                "fallback": (list(FALLBACK_CHOICES), {"default": DEFAULT_FALLBACK,
                                               "tooltip": "format for layers the target cannot store"}),
            },
            "optional": {
                "exclude": ("STRING", {"default": "", "multiline": True,
                                       "tooltip": "regexes (one per line) of layer names to keep unquantized"}),
                "preset": (list(families.PRESET_CHOICES), {"default": "auto", "tooltip": PRESET_TIP}),
                "convrot_group_size": CONVROT_INPUT,
            },
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")
    FUNCTION = "quantize"
    CATEGORY = CATEGORY

    def quantize(self, model, target, block_size, fallback, exclude="", preset="auto",
                 convrot_group_size=LayerOpts.convrot_group_size):
        clone, summary = quantize_model(model, target, int(block_size), fallback, _split_patterns(exclude), preset,
                                        int(convrot_group_size))
        text = summary.text()
        log.info("%s", text)
        return (clone, text)


def _source_choices() -> list[str]:
    fp = importlib.import_module("folder_paths")
    out = []
    for folder in SOURCE_FOLDERS:
        try:
            names = fp.get_filename_list(folder)
        except KeyError:
            continue
        out.extend(f"{folder}/{n}" for n in names if n.endswith(".safetensors"))
    return out


def resolve_source(source: str) -> str:
    """``"<folder>/<file>"`` (as listed by the node) -> the file's full path."""
    folder, _, name = source.partition("/")
    if folder not in SOURCE_FOLDERS or not name:
        raise QuantkitError(f"'{source}' is not '<folder>/<file>' with folder one of {', '.join(SOURCE_FOLDERS)}",
                            fix="pick the file from the node's list")
    fp = importlib.import_module("folder_paths")
    path = fp.get_full_path(folder, name)
    if path is None:
        raise QuantkitError(f"'{name}' is not in ComfyUI's {folder} folders", fix="refresh the node's file list")
    return path


_SAFE_NAME = re.compile(r"^[^/\\\x00]+\.safetensors$")


def output_path(src: str, fmt: str, output_name: str) -> str:
    """Beside the source file (so the model loaders list it); a bare file name only."""
    name = output_name.strip() or default_output_name(os.path.basename(src), fmt)
    if not _SAFE_NAME.match(name) or name in (".safetensors",) or name.startswith(".."):
        raise QuantkitError(f"output name '{output_name}' must be a plain file name ending in .safetensors",
                            fix="leave it empty for <source>-<format>.safetensors")
    return os.path.join(os.path.dirname(src), name)


def resolve_calibration(name: str) -> str | None:
    """A file of ComfyUI's ``calibration`` folder (as the convert node lists it) -> its path; ``none`` -> None."""
    if not name or name == "none":
        return None
    register_folder()
    path = importlib.import_module("folder_paths").get_full_path(FOLDER, name)
    if path is None:
        raise QuantkitError(f"'{name}' is not in ComfyUI's {FOLDER} folder", fix="refresh the node's file list")
    return path


class ProgressReporter:
    """``quantkit.convert``'s ``progress(done, total, name, written)`` -> ``comfy.utils.ProgressBar`` (percent),
    checking ComfyUI's interrupt button on every tensor (an interrupt raises, and ``convert`` then
    removes its temporary file)."""

    STEPS = 100

    def __init__(self) -> None:
        utils = importlib.import_module("comfy.utils")
        self.bar = utils.ProgressBar(self.STEPS)
        try:
            mm = importlib.import_module("comfy.model_management")
            self.check = getattr(mm, "throw_exception_if_processing_interrupted", None)
        except ImportError:
            self.check = None

    def __call__(self, done: int, total: int, name: str, written: int = 0) -> None:
        if self.check is not None:
            self.check()
        self.bar.update_absolute(self.STEPS * done // max(total, 1), self.STEPS)


class QuantkitConvertCheckpoint:
    """Convert a checkpoint in ComfyUI's model folders to a quantized .safetensors file."""

    DESCRIPTION = ("Converts a .safetensors file from ComfyUI's model folders with quantkit and writes the "
                   "result beside it (never over the source).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source": (_source_choices(),),
                "format": (list(FORMATS), {"default": DEFAULT_FORMAT}),
                "block_size": ("INT", {"default": DEFAULT_BLOCK_SIZE, "min": 16, "max": 1024, "step": 16}),
                "fallback": (list(FALLBACK_CHOICES), {"default": DEFAULT_FALLBACK}),
                "output_name": ("STRING", {"default": "", "tooltip": "empty: <source>-<format>.safetensors"}),
                "overwrite": ("BOOLEAN", {"default": False}),
            },
            "optional": {
                "exclude": ("STRING", {"default": "", "multiline": True}),
                "preset": (list(families.PRESET_CHOICES), {"default": "auto", "tooltip": PRESET_TIP}),
                "device": (["auto", "cpu", "cuda"], {"default": "auto",
                                                     "tooltip": "where to quantize (same bytes either way)"}),
                "calibration": (["none"] + calibration_files(), {
                    "default": "none", "tooltip": "stats file from Save Calibration (models/calibration): static "
                                                  "fp8 input_scale, and the data for the two options below"}),
                "learned_rounding": ("BOOLEAN", {"default": False, "tooltip": "choose each weight's rounding to "
                                                 "lower the output error on the calibration data (needs a file "
                                                 "with hessians for the layers it should change)"}),
                "bias_correction": ("BOOLEAN", {"default": False, "tooltip": "fold the mean output error into "
                                                "each bias (needs calibration)"}),
                "convrot_group_size": CONVROT_INPUT,
            },
        }

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "summary")
    FUNCTION = "convert"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def convert(self, source, format, block_size, fallback, output_name, overwrite, exclude="", preset="auto",
                device="auto", calibration="none", learned_rounding=False, bias_correction=False,
                convrot_group_size=LayerOpts.convrot_group_size):
        src = resolve_source(source)
        dst = output_path(src, format, output_name)
        report = convert(src, dst, format=format, block_size=int(block_size), fallback=fallback,
                         exclude=_split_patterns(exclude), overwrite=bool(overwrite), progress=ProgressReporter(),
                         preset=preset, device=device, calibration=resolve_calibration(calibration),
                         learned_rounding=bool(learned_rounding), bias_correction=bool(bias_correction),
                         format_options=dict(format_options(convrot_group_size)))
        q = [layer for layer in report.layers if layer.action != "kept"]
        text = (f"quantkit: wrote {dst} ({report.bytes_out / 1e9:.2f} GB, {len(q)} layers quantized "
                f"to {format}, {report.seconds:.1f} s)")
        for note in report.notes:  # stale temporary files of killed runs removed
            log.info("quantkit: %s", note)
        log.info("%s", text)
        return (dst, text)


NODE_CLASS_MAPPINGS = {
    "QuantkitQuantizeModel": QuantkitQuantizeModel,
    "QuantkitConvertCheckpoint": QuantkitConvertCheckpoint,
    "QuantkitCaptureCalibration": QuantkitCaptureCalibration,
    "QuantkitSaveCalibration": QuantkitSaveCalibration,
    "QuantkitCompareModels": QuantkitCompareModels,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "QuantkitQuantizeModel": "Quantize Model (quantkit)",
    "QuantkitConvertCheckpoint": "Convert Checkpoint (quantkit)",
    "QuantkitCaptureCalibration": "Capture Calibration (quantkit)",
    "QuantkitSaveCalibration": "Save Calibration (quantkit)",
    "QuantkitCompareModels": "Compare Models (quantkit)",
}
