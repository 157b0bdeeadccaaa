"""Stand-in for ``comfy.model_management``: the interrupt check, the devices, unloading."""

import torch

unloaded = []  # test hook: one entry per unload_all_models() call


class InterruptProcessingException(Exception):
    pass


interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    interrupt_processing = value


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    if interrupt_processing:
        interrupt_processing = False
        raise InterruptProcessingException()


def get_torch_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def unload_all_models():
    unloaded.append(True)


def soft_empty_cache(force=False):
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
