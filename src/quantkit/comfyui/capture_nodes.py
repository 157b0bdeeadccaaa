"""Calibration inside ComfyUI: record the linear layers' input statistics while the user's own
workflow samples, and write them as a :mod:`quantkit.calibration` stats file.

**Capture Calibration** takes a MODEL and returns a clone carrying a model function wrapper
(``ModelPatcher.set_model_unet_function_wrapper``, which the samplers call instead of
``apply_model``: ``wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})``). The clone
shares the torch module with the original MODEL, so nothing is attached to that module: the wrapper
registers forward pre-hooks on the linear layers for the duration of one model call and removes them
before it returns. Sampling with the original MODEL (or any other clone) never records. A wrapper
already set on the input MODEL is called inside ours.

The statistics are those of :class:`quantkit.calibration.Accumulator`, the code
:func:`quantkit.calibration.capture` runs, so a capture here equals ``capture(model)`` on the same
inputs. Every call also records its sigma and, from ``transformer_options["sample_sigmas"]``, which
step of the schedule it was; both go into the file's header.

**Save Calibration** takes the capturing MODEL and the sampler's LATENT output (only so that ComfyUI
runs it after the sampling) and writes ``models/calibration/<name>.safetensors``, with layer names as
the checkpoint has them (ComfyUI's ``diffusion_model.`` prefix removed; a full checkpoint's
``model.diffusion_model.`` prefix is matched by :func:`quantkit.calibration.match_layers` when
converting). The file is written to a temporary name and renamed, so a failure leaves no partial file.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import tempfile
from collections import Counter

import torch
from torch import nn

from ..calibration import Accumulator, _gib, available_bytes, match_layers
from ..errors import QuantkitError

log = logging.getLogger("quantkit.comfyui")

CATEGORY = "quantkit"
FOLDER = "calibration"  # ComfyUI models/<FOLDER>, registered with folder_paths
PREFIX = "diffusion_model."  # where ComfyUI's BaseModel keeps the network
CHECK_FOLDERS = ("diffusion_models", "checkpoints")
HESSIAN_TIP = ("regex (searched in layer names as the checkpoint has them) of the layers that get the full "
               "E[x x^T] (needed by learned rounding). K*K*8 bytes each while capturing (a 3072-wide layer: 75 MB; "
               "all of a 12B Flux: ~135 GB). Empty: diagonal statistics for every layer (input_scale and bias "
               "correction need only those)")


def _size(n: int) -> str:
    return _gib(n) if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def register_folder() -> list[str]:
    """Make sure ``folder_paths`` knows ``models/calibration`` (added once, beside the stock folders)."""
    fp = importlib.import_module("folder_paths")
    if FOLDER not in fp.folder_names_and_paths:
        fp.add_model_folder_path(FOLDER, os.path.join(fp.models_dir, FOLDER))
    return fp.get_folder_paths(FOLDER)


def calibration_files() -> list[str]:
    register_folder()
    fp = importlib.import_module("folder_paths")
    return [n for n in fp.get_filename_list(FOLDER) if n.endswith(".safetensors")]


class CaptureSession:
    """What one Capture Calibration node records: the accumulator and which calls fed it."""

    def __init__(self, accumulator: Accumulator) -> None:
        self.accumulator = accumulator
        self.calls = 0
        self.steps: Counter[int] = Counter()  # schedule step index -> model calls
        self.sigmas: list[float] = []  # distinct sigmas, in the order seen

    def record_call(self, timestep: torch.Tensor, transformer_options: dict) -> None:
        self.calls += 1
        sigma = float(timestep.reshape(-1)[0])
        if not any(abs(sigma - s) <= 1e-6 * max(1.0, abs(s)) for s in self.sigmas):
            self.sigmas.append(sigma)
        schedule = transformer_options.get("sample_sigmas")
        if isinstance(schedule, torch.Tensor) and schedule.numel():
            self.steps[int((schedule.float().cpu() - sigma).abs().argmin())] += 1
        else:
            self.steps[-1] += 1  # a call outside a schedule (a sampler that does not say)

    def file_names(self) -> dict[str, str]:
        return {n: n.removeprefix(PREFIX) for n in self.accumulator.stats}

    def calibration(self):
        meta = {"quantkit_source": "comfyui", "quantkit_calls": str(self.calls),
                "quantkit_steps": json.dumps({str(k): v for k, v in sorted(self.steps.items())}),
                "quantkit_sigmas": json.dumps([round(s, 6) for s in self.sigmas])}
        return self.accumulator.calibration(self.file_names(), meta)


class CaptureWrapper:
    """The clone's ``model_function_wrapper``: hooks the linears for one call, then removes them."""

    def __init__(self, session: CaptureSession, base_model: nn.Module, previous=None) -> None:
        self.session = session
        self.base_model = base_model
        self.previous = previous

    def __call__(self, apply_model, args: dict):
        model = getattr(apply_model, "__self__", None)
        if not isinstance(model, nn.Module):
            model = self.base_model
        acc = self.session.accumulator
        handles = []
        try:
            for name, module in model.named_modules():
                if name in acc.stats and isinstance(module, nn.Linear):
                    handles.append(module.register_forward_pre_hook(_hook(acc, name)))
            if self.previous is not None:
                out = self.previous(apply_model, args)
            else:
                out = apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            for h in handles:
                h.remove()
        self.session.record_call(args["timestep"], args["c"].get("transformer_options", {}))
        return out


def _hook(acc: Accumulator, name: str):
    def hook(module: nn.Module, inputs: tuple) -> None:
        acc.add(name, inputs[0])
    return hook


def start_capture(model, hessian_layers: str = "", layers: str = "", device: str = "auto"):
    """``(clone, session, summary)`` for the ModelPatcher ``model``; raises before anything runs when
    the statistics cannot fit on the device they will be accumulated on."""
    if device not in ("auto", "cpu"):
        raise QuantkitError(f"device {device!r} is not 'auto' or 'cpu'")
    clone = model.clone()
    acc_dev = torch.device("cpu") if device == "cpu" else None
    acc = Accumulator.for_model(clone.model, layers.strip() or None, hessian_layers.strip() or None, full=False,
                                device=acc_dev, prefix=PREFIX)
    where = acc_dev if acc_dev is not None else torch.device(clone.load_device)
    need = acc.nbytes()
    free = available_bytes(where)
    # On a GPU the model's weights arrive there too when sampling starts.
    pending = 0
    if where.type == "cuda":
        pending = max(0, int(clone.model_size()) - int(clone.loaded_size()))
    nfull = len(acc.full)
    what = (f"{len(acc.stats)} linear layers ({nfull} with the full E[x x^T], the rest diagonal): "
            f"{_size(need)} of statistics on {where}")
    if free is not None and need + pending > free:
        raise QuantkitError(f"{what}, but {_gib(free)} are free" + (f" and the model needs {_gib(pending)} more"
                                                                      if pending else ""),
                            fix="narrow hessian_layers (or leave it empty for diagonal statistics), or set "
                                "device to cpu")
    session = CaptureSession(acc)
    clone.set_model_unet_function_wrapper(CaptureWrapper(session, clone.model,
                                                         clone.model_options.get("model_function_wrapper")))
    summary = f"quantkit: recording {what}" + (f" ({_gib(free)} free)" if free is not None else "")
    return clone, session, summary


def session_of(model) -> CaptureSession:
    w = getattr(model, "model_options", {}).get("model_function_wrapper")
    while w is not None and not isinstance(w, CaptureWrapper):
        w = getattr(w, "previous", None)
    if w is None:
        raise QuantkitError("this MODEL does not record calibration statistics",
                            fix="connect the MODEL output of Capture Calibration (quantkit), the same one the "
                                "sampler used")
    return w.session


_NAME = re.compile(r"^[^/\\\x00]+$")


def save_calibration(model, filename: str, overwrite: bool = False, check_against: str = "none") -> tuple[str, str]:
    """Write the statistics recorded so far; ``(path, summary)``."""
    session = session_of(model)
    if session.calls == 0:
        raise QuantkitError("no sampling has run with the capturing MODEL yet",
                            fix="sample with the MODEL output of Capture Calibration before saving")
    name = filename.strip()
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    if not _NAME.match(name) or name.startswith("."):
        raise QuantkitError(f"file name '{filename}' must be a plain file name", fix="e.g. flux-calibration")
    folder = register_folder()[0]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    if os.path.exists(path) and not overwrite:
        raise QuantkitError("the calibration file exists", file=path, fix="turn overwrite on or pick another name")
    cal = session.calibration()
    if check_against and check_against != "none":
        from ..safetensors_io import SafetensorsReader
        from .nodes import resolve_source
        src = resolve_source(check_against)
        with SafetensorsReader(src) as r:
            weights = [t.name.removesuffix(".weight") for t in r.tensors_in_order
                       if t.name.endswith(".weight") and len(t.shape) == 2]
        match_layers(weights, cal, file=src)
    fd, tmp = tempfile.mkstemp(prefix=".quantkit-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        cal.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    seen = sum(1 for d in cal.layers.values() if float(d["count"]) > 0)
    steps = ", ".join(str(k) for k in sorted(session.steps) if k >= 0)
    summary = (f"quantkit: wrote {path} ({len(cal.layers)} layers, {seen} ran; {session.calls} model calls at "
               f"{len(session.sigmas)} sigmas; steps {steps or '-'}; second order {cal.second_order})")
    return path, summary


def _checkpoint_choices() -> list[str]:
    fp = importlib.import_module("folder_paths")
    out = ["none"]
    for folder in CHECK_FOLDERS:
        try:
            names = fp.get_filename_list(folder)
        except KeyError:
            continue
        out.extend(f"{folder}/{n}" for n in names if n.endswith(".safetensors"))
    return out


class QuantkitCaptureCalibration:
    """MODEL in, a recording clone out; sample with it as usual, then save with Save Calibration."""

    DESCRIPTION = ("Returns a clone of the MODEL that records the input statistics of its linear layers while "
                   "your workflow samples with it (any sampler, steps and prompts; cond and uncond both count). "
                   "The input MODEL does not record. Save the statistics with Save Calibration (quantkit) and "
                   "use them in Convert Checkpoint (quantkit) or `quantkit convert --calibration`.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "hessian_layers": ("STRING", {"default": "", "tooltip": HESSIAN_TIP}),
                "device": (["auto", "cpu"], {"default": "auto",
                                            "tooltip": "where statistics accumulate (auto: where the model runs)"}),
            },
            "optional": {
                "layers": ("STRING", {"default": "", "tooltip": "regex: record only these layers (empty: all)"}),
            },
        }

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "summary")
    FUNCTION = "capture"
    CATEGORY = CATEGORY

    def capture(self, model, hessian_layers, device, layers=""):
        clone, _session, summary = start_capture(model, hessian_layers, layers, device)
        log.info("%s", summary)
        return (clone, summary)


class QuantkitSaveCalibration:
    """Writes what a Capture Calibration clone recorded into models/calibration."""

    DESCRIPTION = ("Writes the statistics recorded by a Capture Calibration (quantkit) MODEL to "
                   "models/calibration/<name>.safetensors. Connect the sampler's LATENT output to `samples` so "
                   "this runs after sampling. Statistics keep accumulating over queued runs until the capture "
                   "node runs again.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "samples": ("LATENT", {"tooltip": "the sampler's output (orders this node after the sampling)"}),
                "filename": ("STRING", {"default": "calibration"}),
                "overwrite": ("BOOLEAN", {"default": False}),
            },
            "optional": {
                "check_against": (_checkpoint_choices(), {"default": "none",
                                                          "tooltip": "checkpoint whose layer names the file must "
                                                                     "match (checked before writing)"}),
            },
        }

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("path", "summary")
    FUNCTION = "save"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def save(self, model, samples, filename, overwrite, check_against="none"):
        path, summary = save_calibration(model, filename, bool(overwrite), check_against)
        log.info("%s", summary)
        return (path, summary)
