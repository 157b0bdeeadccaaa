"""Stand-in for ``comfy.utils``: attribute paths and the progress bar."""

PROGRESS_BAR_HOOK = None


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    instances = []  # test hook: every bar made

    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.node_id = node_id
        self.updates = []
        ProgressBar.instances.append(self)

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        value = min(value, self.total)
        self.current = value
        self.updates.append((value, self.total))
        if PROGRESS_BAR_HOOK is not None:
            PROGRESS_BAR_HOOK(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj, attr, value):
    *parents, last = attr.split(".")
    for name in parents:
        obj = getattr(obj, name)
    prev = getattr(obj, last)
    setattr(obj, last, value)
    return prev


def deepcopy_list_dict(obj, memo=None):
    if memo is None:
        memo = {}
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        res = {deepcopy_list_dict(k, memo): deepcopy_list_dict(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        res = [deepcopy_list_dict(i, memo) for i in obj]
    else:
        res = obj
    memo[id(obj)] = res
    return res


def repeat_to_batch_size(tensor, batch_size, dim=0):
    import math
    if tensor.shape[dim] > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if tensor.shape[dim] < batch_size:
        reps = dim * [1] + [math.ceil(batch_size / tensor.shape[dim])] + [1] * (len(tensor.shape) - 1 - dim)
        return tensor.repeat(reps).narrow(dim, 0, batch_size)
    return tensor


def convert_old_quants(state_dict, model_prefix="", metadata={}):
    """ComfyUI's load-time conversion (comfy/utils.py at 09708eae, same name and signature): a
    header ``_quantization_metadata`` puts its per-layer objects into ``L.comfy_quant`` tensors;
    without one, a legacy ``<prefix>scaled_fp8`` state dict is rewritten: the marker goes,
    ``L.scale_weight`` becomes ``L.weight_scale`` with marker ``{"format": "float8_e4m3fn"}`` (plus
    ``full_precision_matrix_mult`` when the marker holds 2 elements), ``L.scale_input`` becomes
    ``L.input_scale`` unless it is 1.0; tensors outside the prefix are left alone."""
    import json

    import torch

    metadata = {} if metadata is None else metadata
    if "_quantization_metadata" in metadata:
        layers = json.loads(metadata["_quantization_metadata"])["layers"]
    else:
        marker = f"{model_prefix}scaled_fp8"
        if marker not in state_dict:
            return state_dict, metadata
        fpmm = state_dict[marker].nelement() == 2
        converted, layers = {}, {}
        for key, value in state_dict.items():
            if key == marker:
                continue
            if not key.startswith(model_prefix):
                converted[key] = value
            elif key.endswith(".scale_weight"):
                layer = key[: -len(".scale_weight")]
                converted[f"{layer}.weight_scale"] = value
                layers[layer] = {"format": "float8_e4m3fn", **({"full_precision_matrix_mult": True} if fpmm else {})}
            elif key.endswith(".scale_input"):
                if value.item() != 1.0:
                    converted[f"{key[: -len('.scale_input')]}.input_scale"] = value
            else:
                converted[key] = value
        state_dict = converted
    for layer, conf in layers.items():
        state_dict[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
    return state_dict, metadata
