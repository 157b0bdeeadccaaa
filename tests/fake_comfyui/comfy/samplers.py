"""Stand-in for ``comfy.samplers``: ``KSampler`` with ComfyUI's constructor and ``sample`` signature
and its ``SAMPLERS`` / ``SCHEDULERS`` lists (reduced: every sampler runs Euler on a linear flow
schedule). What the quantkit nodes rely on is kept as in ComfyUI: the patcher's object patches are
in place while it samples (``load_models_gpu`` -> ``patch_model``), each model call goes through
``model_options["model_function_wrapper"](apply_model, {"input", "timestep", "c", "cond_or_uncond"})``
when set (``_calc_cond_batch``), ``c["transformer_options"]`` holds ``sigmas`` (this call's) and
``sample_sigmas`` (the schedule), cond and uncond run as one batch, cfg 1 skips the uncond, and
``callback(step, denoised, x, total_steps)`` follows every step (``KSAMPLER.sample``)."""

import torch

KSAMPLER_NAMES = ["euler", "euler_ancestral", "heun", "dpmpp_2m"]
SAMPLER_NAMES = KSAMPLER_NAMES + ["ddim", "uni_pc"]
SCHEDULER_NAMES = ["simple", "normal", "karras", "beta"]


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    base = model
    xs, cs, cond_or_uncond = [], [], []
    for i, cond in enumerate(conds):
        if cond is None:
            continue
        xs.append(x_in)
        cs.append(cond)
        cond_or_uncond.append(i)
    input_x = torch.cat(xs)
    timestep_ = torch.cat([timestep] * len(xs))
    transformer_options = dict(model_options.get("transformer_options", {}))
    transformer_options["cond_or_uncond"] = cond_or_uncond[:]
    transformer_options["sigmas"] = timestep
    c = {"c_crossattn": torch.cat(cs), "transformer_options": transformer_options}
    if "model_function_wrapper" in model_options:
        output = model_options["model_function_wrapper"](base.apply_model, {"input": input_x, "timestep": timestep_,
                                                                            "c": c, "cond_or_uncond": cond_or_uncond})
    else:
        output = base.apply_model(input_x, timestep_, **c)
    out = [None] * len(conds)
    for o, chunk in zip(cond_or_uncond, output.chunk(len(xs))):
        out[o] = chunk
    return out


class KSampler:
    SCHEDULERS = SCHEDULER_NAMES
    SAMPLERS = SAMPLER_NAMES

    def __init__(self, model, steps, device, sampler=None, scheduler=None, denoise=None, model_options={}):
        self.model = model
        self.device = device
        self.sampler = sampler if sampler in self.SAMPLERS else self.SAMPLERS[0]
        self.scheduler = scheduler if scheduler in self.SCHEDULERS else self.SCHEDULERS[0]
        self.steps = steps
        self.denoise = denoise
        self.model_options = model_options
        ms = model.get_model_object("model_sampling")
        self.sigmas = torch.linspace(float(ms.sigma_max), 0.0, steps + 1)

    def sample(self, noise, positive, negative, cfg, latent_image=None, start_step=None, last_step=None,
               force_full_denoise=False, denoise_mask=None, sigmas=None, callback=None, disable_pbar=False, seed=None):
        sigmas = self.sigmas if sigmas is None else sigmas
        patcher = self.model
        patcher.patch_model(device_to=self.device)
        try:
            base = patcher.model
            options = dict(self.model_options)
            options["transformer_options"] = dict(options.get("transformer_options", {}), sample_sigmas=sigmas)
            cond = positive[0][0]
            uncond = negative[0][0] if negative else None
            x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent_image  # flow noise scaling
            total = len(sigmas) - 1
            with torch.no_grad():
                for i in range(total):
                    s = sigmas[i].reshape(1).repeat(x.shape[0])
                    conds = [cond, None if cfg == 1.0 else uncond]
                    out = calc_cond_batch(base, conds, x, s, options)
                    denoised = out[0] if out[1] is None else out[1] + (out[0] - out[1]) * cfg
                    if callback is not None:
                        callback(i, denoised, x, total)
                    d = (x - denoised) / sigmas[i]
                    x = x + d * (sigmas[i + 1] - sigmas[i])
            return x
        finally:
            patcher.unpatch_model()
