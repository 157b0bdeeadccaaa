"""quantkit's ComfyUI custom node. Copy or symlink this folder into ``ComfyUI/custom_nodes/`` and
``pip install`` quantkit into ComfyUI's Python (see the README's "ComfyUI node" section).

On import it registers the formats quantkit writes that stock ComfyUI lacks (``int8_blockwise``)
and exports the node classes. All logic lives in the installed ``quantkit.comfyui`` package.
"""

import logging

try:
    from quantkit.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from quantkit.comfyui.register import register
except ImportError as e:  # quantkit (or comfy-kitchen) is not installed in ComfyUI's Python
    logging.getLogger("quantkit.comfyui").error(
        "quantkit node not loaded: %s (run `pip install quantkit` with ComfyUI's Python)", e)
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}
else:
    register()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
