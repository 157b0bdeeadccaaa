"""quantkit inside ComfyUI: what the custom node in ``comfyui_node/`` runs.

Needs comfy-kitchen (ComfyUI's kernel library); ComfyUI's own modules (``comfy.quant_ops``,
``comfy.ops``, ``comfy.model_patcher``, ``comfy.utils``, ``folder_paths``) are imported only inside
the functions that use them, so this package imports (and is tested) without ComfyUI.

* :mod:`.layout` -- ``int8_blockwise`` as a comfy-kitchen ``QuantizedLayout`` (dequantization is
  :func:`quantkit.reference.dequantize`), with its ``F.linear`` handlers and the Triton fast path
* :mod:`.loader` -- reads one ``int8_blockwise`` layer of a state dict into a ComfyUI module
* :mod:`.register` -- puts the format into ``comfy.quant_ops`` / comfy-kitchen and wraps
  ``comfy.ops._load_quantized_module`` (idempotent; leaves every stock format to ComfyUI)
* :mod:`.quantize_model` -- quantize-at-load: a MODEL clone whose linear layers are quantized
* :mod:`.nodes` -- the node classes (ComfyUI's ``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION``)

ComfyUI code read to write this: Comfy-Org/ComfyUI, see ``comfyui_node/README`` section in the
repository README for the commits.
"""
