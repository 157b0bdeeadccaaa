"""Stand-in for ``comfy.model_patcher.ModelPatcher``: clone shares the torch module; object patches
are swapped in by ``patch_model`` and back by ``unpatch_model``."""

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
        n.model_options = {"transformer_options": dict(self.model_options["transformer_options"])}
        n.backup = self.backup
        n.object_patches_backup = self.object_patches_backup
        n.parent = self
        return n

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
