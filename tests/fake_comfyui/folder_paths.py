"""Stand-in for ComfyUI's ``folder_paths`` (model folder lookup)."""

import os

models_dir = os.path.join(os.path.dirname(os.path.realpath(__file__)), "models")  # tests set their own
supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths = {}


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    if folder_name not in folder_names_and_paths:  # a new folder lists every file, as in ComfyUI
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path not in paths:
        paths.insert(0, full_folder_path) if is_default else paths.append(full_folder_path)


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_full_path(folder_name, filename):
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for x in folder_names_and_paths[folder_name][0]:
        full = os.path.join(x, filename)
        if os.path.isfile(full):
            return full
    return None


def get_full_path_or_raise(folder_name, filename):
    p = get_full_path(folder_name, filename)
    if p is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return p


def get_filename_list(folder_name):
    paths, exts = folder_names_and_paths[folder_name]
    out = set()
    for d in paths:
        for root, _dirs, files in os.walk(d):
            for f in files:
                if not exts or os.path.splitext(f)[1].lower() in exts:
                    out.add(os.path.relpath(os.path.join(root, f), d))
    return sorted(out)
