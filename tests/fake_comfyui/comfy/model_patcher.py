"""Stand-in for ``comfy.model_patcher.ModelPatcher``: clone shares the torch module and deep-copies
``model_options`` (lists and dicts; functions by reference, as ``comfy.utils.deepcopy_list_dict``);
object patches are swapped in by ``patch_model`` and back by ``unpatch_model``;
``set_model_unet_function_wrapper`` sets ``model_options["model_function_wrapper"]``, which the
samplers (comfy/samplers.py stand-in) call instead of ``apply_model``."""

import comfy.utils


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False, fast_disk=False):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size
        self.weight_inplace_update = weight_inplace_update
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.parent = None

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.object_patches = self.object_patches.copy()
        n.model_options = comfy.utils.deepcopy_list_dict(self.model_options)
        n.backup = self.backup
        n.object_patches_backup = self.object_patches_backup
        n.parent = self
        return n

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())
        return self.size

    def loaded_size(self):
        return getattr(self.model, "model_loaded_weight_memory", 0)

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return comfy.utils.get_attr(self.model, name)

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        for k, obj in self.object_patches.items():
            old = comfy.utils.set_attr(self.model, k, obj)
            if k not in self.object_patches_backup:
                self.object_patches_backup[k] = old
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        for k in list(self.object_patches_backup):
            comfy.utils.set_attr(self.model, k, self.object_patches_backup[k])
        self.object_patches_backup.clear()
