"""Stand-in for ``comfy.model_base.BaseModel`` (reduced: built around a given diffusion model,
ComfyUI's constructor takes a model config). As in ComfyUI the network sits at
``.diffusion_model`` (so its layers are named ``diffusion_model.*``), ``model_sampling`` and
``latent_format`` are attributes, and ``apply_model(x, t, c_crossattn=..., transformer_options=...)``
returns the denoised latent (flow matching: ``x - sigma * v``)."""

import torch


class ModelSamplingFlow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("sigmas", torch.linspace(0.001, 1.0, 1000))

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]


class LatentFormat:
    latent_channels = 4
    latent_dimensions = 2


class BaseModel(torch.nn.Module):
    def __init__(self, diffusion_model, latent_channels=4):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSamplingFlow()
        self.latent_format = LatentFormat()
        self.latent_format.latent_channels = latent_channels
        self.calls = 0  # test hook

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        self.calls += 1
        sigma = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        v = self.diffusion_model(x, t, context=c_crossattn, transformer_options=transformer_options)
        return x - sigma * v
