"""Compare Models: sample the original and the quantized MODEL with the same seed, prompt, latent,
steps and sampler (ComfyUI's own ``comfy.sample.sample``, as ``nodes.common_ksampler`` calls it),
decode both with the VAE and report how far apart they are.

Reported: PSNR and SSIM of the decoded images (:mod:`quantkit.compare`), LPIPS where the ``lpips``
package is installed and its network loads, the relative L2 of the final latents, the cosine of the
two models' denoised predictions at every step (from the sampler's per-step callback), seconds per
step (median time between callbacks: model loading falls in the first step and is left out) and the
peak VRAM of each run (``torch.cuda.max_memory_allocated``; ComfyUI's models are unloaded before each
run, so each peak is that model's own). The verdict uses :func:`quantkit.compare.verdict`.
"""

from __future__ import annotations

import importlib
import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..compare import THRESHOLDS, cosine, psnr, rel_l2, ssim, verdict

log = logging.getLogger("quantkit.comfyui")

T = THRESHOLDS
VERDICT_TIP = (f"indistinguishable: PSNR >= {T['indistinguishable_psnr_db']:g} dB and SSIM >= "
               f"{T['indistinguishable_ssim']:g}; broken: final-latent relative L2 > {T['broken_latent_rel_l2']:g} "
               f"or SSIM < {T['broken_ssim']:g}; otherwise minor differences")


@dataclass
class Run:
    samples: torch.Tensor
    image: torch.Tensor
    denoised: list[torch.Tensor] = field(default_factory=list)
    seconds_per_step: float = 0.0
    peak_vram: int | None = None


def _sample(model, vae, positive, negative, latent, seed, steps, cfg, sampler_name, scheduler, denoise) -> Run:
    sample = importlib.import_module("comfy.sample")
    mm = importlib.import_module("comfy.model_management")
    mm.unload_all_models()
    mm.soft_empty_cache()
    latent_image = sample.fix_empty_latent_channels(model, latent["samples"])
    noise = sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    dev = torch.device(model.load_device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    denoised: list[torch.Tensor] = []
    stamps = [time.perf_counter()]

    def callback(step, x0, x, total_steps):
        denoised.append(x0.detach().float().cpu())  # the copy synchronises the device
        stamps.append(time.perf_counter())
        mm.throw_exception_if_processing_interrupted()

    samples = sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                            denoise=denoise, noise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=True, seed=seed)
    peak = int(torch.cuda.max_memory_allocated(dev)) if cuda else None
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    sps = statistics.median(gaps[1:]) if len(gaps) > 1 else (gaps[0] if gaps else 0.0)
    image = vae.decode(samples)
    if image.dim() == 5:  # video VAEs: (B, T, H, W, C), combined as VAEDecode does
        image = image.reshape(-1, image.shape[-3], image.shape[-2], image.shape[-1])
    return Run(samples.float().cpu(), image.float().cpu().clamp(0, 1), denoised, sps, peak)


_LPIPS = {}


def lpips_distance(a: torch.Tensor, b: torch.Tensor) -> tuple[float | None, str]:
    """LPIPS (AlexNet) of two IMAGE batches, or (None, why not)."""
    try:
        import lpips  # optional
    except ImportError:
        return None, "lpips not installed"
    try:
        if "net" not in _LPIPS:
            _LPIPS["net"] = lpips.LPIPS(net="alex", verbose=False).eval()
        net = _LPIPS["net"]
        with torch.no_grad():
            d = net(a.permute(0, 3, 1, 2) * 2 - 1, b.permute(0, 3, 1, 2) * 2 - 1)
        return float(d.mean()), ""
    except Exception as e:  # its weights may be missing offline
        return None, f"lpips failed: {type(e).__name__}"


def compare_runs(ref: Run, got: Run) -> dict:
    p = psnr(ref.image, got.image)
    s = ssim(ref.image, got.image)
    r = rel_l2(ref.samples, got.samples)
    steps = [cosine(a, b) for a, b in zip(ref.denoised, got.denoised)]
    lp, why = lpips_distance(ref.image, got.image)
    return {"psnr_db": p, "ssim": s, "latent_rel_l2": r, "step_cosine": steps, "lpips": lp, "lpips_note": why,
            "verdict": verdict(p, s, r), "seconds_per_step": (ref.seconds_per_step, got.seconds_per_step),
            "peak_vram": (ref.peak_vram, got.peak_vram)}


def report_text(m: dict) -> str:
    lines = [f"quantkit compare: {m['verdict']}",
             f"PSNR {m['psnr_db']:.2f} dB, SSIM {m['ssim']:.4f}, final latent relative L2 {m['latent_rel_l2']:.4f}",
             "LPIPS " + (f"{m['lpips']:.4f}" if m["lpips"] is not None else f"n/a ({m['lpips_note']})")]
    sc = m["step_cosine"]
    if sc:
        worst = min(range(len(sc)), key=lambda i: sc[i])
        lines.append(f"denoised cosine per step: {', '.join(f'{c:.5f}' for c in sc)} (worst {sc[worst]:.5f} at "
                     f"step {worst})")
    so, sq = m["seconds_per_step"]
    lines.append(f"seconds per step: original {so:.3f}, quantized {sq:.3f}")
    vo, vq = m["peak_vram"]
    lines.append("peak VRAM: " + (f"original {vo / 2**30:.2f} GiB, quantized {vq / 2**30:.2f} GiB"
                                  if vo is not None else "n/a (not on a CUDA device)"))
    return "\n".join(lines)


class QuantkitCompareModels:
    """Sample the original and the quantized model alike and say whether the quantized one still works."""

    DESCRIPTION = ("Samples the original and the quantized MODEL with the same seed, conditioning, latent, steps "
                   "and sampler, decodes both, and reports PSNR / SSIM (LPIPS if installed), final-latent error, "
                   "per-step cosine of the denoised predictions, seconds per step and peak VRAM. "
                   "Verdict: " + VERDICT_TIP + ".")

    @classmethod
    def INPUT_TYPES(cls):
        samplers = importlib.import_module("comfy.samplers")
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the original model"}),
                "quantized_model": ("MODEL", {"tooltip": "a loaded quantized file, or Quantize Model's output"}),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "vae": ("VAE",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                "sampler_name": (samplers.KSampler.SAMPLERS,),
                "scheduler": (samplers.KSampler.SCHEDULERS,),
            },
            "optional": {
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
        }

    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "STRING")
    RETURN_NAMES = ("original", "quantized", "verdict", "report")
    OUTPUT_TOOLTIPS = ("", "", VERDICT_TIP, "")
    FUNCTION = "compare"
    CATEGORY = "quantkit"
    OUTPUT_NODE = True

    def compare(self, model, quantized_model, positive, negative, latent_image, vae, seed, steps, cfg, sampler_name,
                scheduler, denoise=1.0):
        args = (positive, negative, latent_image, int(seed), int(steps), float(cfg), sampler_name, scheduler,
                float(denoise))
        ref = _sample(model, vae, *args)
        got = _sample(quantized_model, vae, *args)
        m = compare_runs(ref, got)
        text = report_text(m)
        log.info("%s", text)
        return (ref.image, got.image, m["verdict"], text)
