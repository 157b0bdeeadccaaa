"""Synthetic key sets that mirror each family's real tensor names (small widths; the shapes that
detection reads keep their real size). Each builder returns (name -> shape, layers the family
keeps in high precision). Names follow ComfyUI's loaders and the original/diffusers/HF exports."""

from __future__ import annotations

H = 64


class Keys(dict):
    def lin(self, name: str, out: int = H, inp: int = H, bias: bool = True) -> Keys:
        self[f"{name}.weight"] = (out, inp)
        if bias:
            self[f"{name}.bias"] = (out,)
        return self

    def vec(self, name: str, n: int = H) -> Keys:
        self[name] = (n,)
        return self


def flux1(nd: int = 2, ns: int = 2):
    k = Keys().lin("img_in", H, 64).lin("txt_in", H, 128)
    for p in ("time_in", "vector_in", "guidance_in"):
        k.lin(f"{p}.in_layer", H, 32).lin(f"{p}.out_layer")
    for i in range(nd):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            k.lin(f"{b}_mod.lin", 6 * H).lin(f"{b}_attn.qkv", 3 * H).lin(f"{b}_attn.proj")
            k.lin(f"{b}_mlp.0", 4 * H).lin(f"{b}_mlp.2", H, 4 * H).vec(f"{b}_attn.norm.query_norm.scale", 16)
    for i in range(ns):
        b = f"single_blocks.{i}"
        k.lin(f"{b}.linear1", 7 * H).lin(f"{b}.linear2", H, 5 * H).lin(f"{b}.modulation.lin", 3 * H)
        k.vec(f"{b}.norm.key_norm.scale", 16)
    k.lin("final_layer.linear", 64).lin("final_layer.adaLN_modulation.1", 2 * H)
    keep = {"img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1"}
    keep |= {f"{p}.{x}_layer" for p in ("time_in", "vector_in", "guidance_in") for x in ("in", "out")}
    keep |= {f"double_blocks.{i}.{s}_mod.lin" for i in range(nd) for s in ("img", "txt")}
    keep |= {f"single_blocks.{i}.modulation.lin" for i in range(ns)}
    return k, keep


def flux2(nd: int = 2, ns: int = 3):
    k = Keys().lin("img_in", H, 128, False).lin("txt_in", H, 256, False)
    for p in ("time_in", "guidance_in"):
        k.lin(f"{p}.in_layer", H, 32, False).lin(f"{p}.out_layer", bias=False)
    k.lin("double_stream_modulation_img.lin", 6 * H, bias=False).lin("double_stream_modulation_txt.lin", 6 * H, bias=False)
    k.lin("single_stream_modulation.lin", 3 * H, bias=False)
    for i in range(nd):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            k.lin(f"{b}_attn.qkv", 3 * H, bias=False).lin(f"{b}_attn.proj", bias=False)
            k.lin(f"{b}_mlp.0", 6 * H, bias=False).lin(f"{b}_mlp.2", H, 3 * H, bias=False)
    for i in range(ns):
        k.lin(f"single_blocks.{i}.linear1", 9 * H, bias=False).lin(f"single_blocks.{i}.linear2", H, 4 * H, bias=False)
    k.lin("final_layer.linear", 128, bias=False).lin("final_layer.adaLN_modulation.1", 2 * H, bias=False)
    keep = {"img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
            "guidance_in.out_layer", "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
            "single_stream_modulation.lin", "final_layer.linear", "final_layer.adaLN_modulation.1"}
    return k, keep


def chroma(nd: int = 2, ns: int = 2, ng: int = 3):
    k = Keys().lin("img_in", H, 64).lin("txt_in", H, 128)
    k.lin("distilled_guidance_layer.in_proj", H, 64).lin("distilled_guidance_layer.out_proj")
    for i in range(ng):
        k.lin(f"distilled_guidance_layer.layers.{i}.in_layer").lin(f"distilled_guidance_layer.layers.{i}.out_layer")
        k.vec(f"distilled_guidance_layer.norms.{i}.scale")
    for i in range(nd):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            k.lin(f"{b}_attn.qkv", 3 * H).lin(f"{b}_attn.proj").lin(f"{b}_mlp.0", 4 * H).lin(f"{b}_mlp.2", H, 4 * H)
    for i in range(ns):
        k.lin(f"single_blocks.{i}.linear1", 7 * H).lin(f"single_blocks.{i}.linear2", H, 5 * H)
    k.lin("final_layer.linear", 64)
    keep = {"img_in", "txt_in", "final_layer.linear", "distilled_guidance_layer.in_proj",
            "distilled_guidance_layer.out_proj"}
    keep |= {f"distilled_guidance_layer.layers.{i}.{x}_layer" for i in range(ng) for x in ("in", "out")}
    return k, keep


def sd3(n: int = 3):
    k = Keys().lin("context_embedder", H, 128)
    k["x_embedder.proj.weight"] = (H, 16, 2, 2)
    k["pos_embed"] = (1, 256, H)
    for p in ("t_embedder", "y_embedder"):
        k.lin(f"{p}.mlp.0", H, 32).lin(f"{p}.mlp.2")
    keep = {"context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
            "final_layer.linear", "final_layer.adaLN_modulation.1"}
    for i in range(n):
        for blk in ("x_block", "context_block"):
            b = f"joint_blocks.{i}.{blk}"
            last_ctx = blk == "context_block" and i == n - 1  # SD3's last context block is pre-only
            k.lin(f"{b}.adaLN_modulation.1", (2 if last_ctx else 6) * H).lin(f"{b}.attn.qkv", 3 * H)
            k.vec(f"{b}.attn.ln_q.weight", 16)
            keep.add(f"{b}.adaLN_modulation.1")
            if not last_ctx:
                k.lin(f"{b}.attn.proj").lin(f"{b}.mlp.fc1", 4 * H).lin(f"{b}.mlp.fc2", H, 4 * H)
    k.lin("final_layer.linear", 64).lin("final_layer.adaLN_modulation.1", 2 * H)
    return k, keep


def sdxl():
    k = Keys().lin("time_embed.0", 4 * H, H).lin("time_embed.2", 4 * H, 4 * H)
    k.lin("label_emb.0.0", 4 * H, 2816).lin("label_emb.0.2", 4 * H, 4 * H)
    k["input_blocks.0.0.weight"] = (H, 4, 3, 3)
    keep = {"time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2"}

    def res(p):
        k[f"{p}.in_layers.2.weight"] = (H, H, 3, 3)
        k.lin(f"{p}.emb_layers.1", H, 4 * H).vec(f"{p}.in_layers.0.weight")
        k[f"{p}.out_layers.3.weight"] = (H, H, 3, 3)
        keep.add(f"{p}.emb_layers.1")

    def xf(p, depth=2):
        k.lin(f"{p}.proj_in").lin(f"{p}.proj_out").vec(f"{p}.norm.weight")
        for j in range(depth):
            t = f"{p}.transformer_blocks.{j}"
            for a in ("attn1", "attn2"):
                k.lin(f"{t}.{a}.to_q", bias=False).lin(f"{t}.{a}.to_k", H, 2048 if a == "attn2" else H, False)
                k.lin(f"{t}.{a}.to_v", H, 2048 if a == "attn2" else H, False).lin(f"{t}.{a}.to_out.0")
            k.lin(f"{t}.ff.net.0.proj", 8 * H).lin(f"{t}.ff.net.2", H, 4 * H).vec(f"{t}.norm1.weight")

    res("input_blocks.1.0")
    res("input_blocks.4.0")
    xf("input_blocks.4.1")
    res("middle_block.0")
    xf("middle_block.1", 3)
    res("middle_block.2")
    res("output_blocks.2.0")
    xf("output_blocks.2.1")
    k["out.2.weight"] = (4, H, 3, 3)
    return k, keep


def wan(n: int = 2, i2v: bool = True):
    k = Keys()
    k["patch_embedding.weight"] = (H, 16, 1, 2, 2)
    k.lin("text_embedding.0", H, 4096).lin("text_embedding.2").lin("time_embedding.0", H, 256)
    k.lin("time_embedding.2").lin("time_projection.1", 6 * H)
    keep = {"text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1",
            "head.head"}
    for i in range(n):
        b = f"blocks.{i}"
        for a in ("self_attn", "cross_attn"):
            for x in ("q", "k", "v", "o"):
                k.lin(f"{b}.{a}.{x}")
            k.vec(f"{b}.{a}.norm_q.weight").vec(f"{b}.{a}.norm_k.weight")
        if i2v:
            k.lin(f"{b}.cross_attn.k_img").lin(f"{b}.cross_attn.v_img").vec(f"{b}.cross_attn.norm_k_img.weight")
        k.lin(f"{b}.ffn.0", 4 * H).lin(f"{b}.ffn.2", H, 4 * H).vec(f"{b}.norm3.weight")
        k[f"{b}.modulation"] = (1, 6, H)
    k.lin("head.head", 64)
    k["head.modulation"] = (1, 2, H)
    if i2v:
        k.vec("img_emb.proj.0.weight", 1280).lin("img_emb.proj.1", 1280, 1280).lin("img_emb.proj.3", H, 1280)
        k.vec("img_emb.proj.4.weight")
        keep |= {"img_emb.proj.1", "img_emb.proj.3"}
    return k, keep


def hunyuan_video(nd: int = 2, ns: int = 2, nr: int = 2):
    k = Keys()
    k["img_in.proj.weight"] = (H, 16, 1, 2, 2)
    k.lin("txt_in.input_embedder", H, 4096).lin("txt_in.t_embedder.mlp.0", H, 256).lin("txt_in.t_embedder.mlp.2")
    k.lin("txt_in.c_embedder.linear_1", H, 4096).lin("txt_in.c_embedder.linear_2")
    keep = {"txt_in.input_embedder", "txt_in.t_embedder.mlp.0", "txt_in.t_embedder.mlp.2",
            "txt_in.c_embedder.linear_1", "txt_in.c_embedder.linear_2", "time_in.mlp.0", "time_in.mlp.2",
            "vector_in.in_layer", "vector_in.out_layer", "guidance_in.mlp.0", "guidance_in.mlp.2",
            "final_layer.linear", "final_layer.adaLN_modulation.1"}
    for i in range(nr):
        b = f"txt_in.individual_token_refiner.blocks.{i}"
        k.lin(f"{b}.self_attn_qkv", 3 * H).lin(f"{b}.self_attn_proj").lin(f"{b}.mlp.fc1", 4 * H)
        k.lin(f"{b}.mlp.fc2", H, 4 * H).lin(f"{b}.adaLN_modulation.1", 2 * H).vec(f"{b}.norm1.weight")
        keep.add(f"{b}.adaLN_modulation.1")
    k.lin("time_in.mlp.0", H, 256).lin("time_in.mlp.2").lin("vector_in.in_layer", H, 768).lin("vector_in.out_layer")
    k.lin("guidance_in.mlp.0", H, 256).lin("guidance_in.mlp.2")
    for i in range(nd):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            k.lin(f"{b}_mod.linear", 6 * H).lin(f"{b}_attn_qkv", 3 * H).lin(f"{b}_attn_proj")
            k.lin(f"{b}_mlp.fc1", 4 * H).lin(f"{b}_mlp.fc2", H, 4 * H).vec(f"{b}_attn_q_norm.weight", 16)
            keep.add(f"{b}_mod.linear")
    for i in range(ns):
        b = f"single_blocks.{i}"
        k.lin(f"{b}.linear1", 7 * H).lin(f"{b}.linear2", H, 5 * H).lin(f"{b}.modulation.linear", 3 * H)
        k.vec(f"{b}.q_norm.weight", 16)
        keep.add(f"{b}.modulation.linear")
    k.lin("final_layer.linear", 64).lin("final_layer.adaLN_modulation.1", 2 * H)
    return k, keep


def qwen_image(n: int = 2):
    k = Keys().lin("img_in", H, 64).vec("txt_norm.weight", 3584).lin("txt_in", H, 3584)
    k.lin("time_text_embed.timestep_embedder.linear_1", H, 256).lin("time_text_embed.timestep_embedder.linear_2")
    keep = {"img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.timestep_embedder.linear_2", "norm_out.linear", "proj_out"}
    for i in range(n):
        b = f"transformer_blocks.{i}"
        k.lin(f"{b}.img_mod.1", 6 * H).lin(f"{b}.txt_mod.1", 6 * H)
        keep |= {f"{b}.img_mod.1", f"{b}.txt_mod.1"}
        for x in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            k.lin(f"{b}.attn.{x}")
        for x in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            k.vec(f"{b}.attn.{x}.weight", 16)
        for s in ("img", "txt"):
            k.lin(f"{b}.{s}_mlp.net.0.proj", 4 * H).lin(f"{b}.{s}_mlp.net.2", H, 4 * H)
    k.lin("norm_out.linear", 2 * H).lin("proj_out", 64)
    return k, keep


def nextdit(cap: int, n: int = 2, nr: int = 2):
    k = Keys().lin("x_embedder", H, 64).vec("cap_embedder.0.weight", cap).lin("cap_embedder.1", H, cap)
    k.lin("t_embedder.mlp.0", H, 256).lin("t_embedder.mlp.2")
    k["x_pad_token"] = (1, H)
    k["cap_pad_token"] = (1, H)
    keep = {"x_embedder", "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2", "final_layer.linear",
            "final_layer.adaLN_modulation.1"}

    def block(b, mod):
        k.lin(f"{b}.attention.qkv", 3 * H, bias=False).lin(f"{b}.attention.out", bias=False)
        k.vec(f"{b}.attention.q_norm.weight", 16).vec(f"{b}.attention.k_norm.weight", 16)
        k.lin(f"{b}.feed_forward.w1", 3 * H, bias=False).lin(f"{b}.feed_forward.w2", H, 3 * H, bias=False)
        k.lin(f"{b}.feed_forward.w3", 3 * H, bias=False)
        for x in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            k.vec(f"{b}.{x}.weight")
        if mod:
            k.lin(f"{b}.adaLN_modulation.0", 4 * H, 256)
            keep.add(f"{b}.adaLN_modulation.0")

    for i in range(nr):
        block(f"noise_refiner.{i}", True)
        block(f"context_refiner.{i}", False)
    for i in range(n):
        block(f"layers.{i}", True)
    k.lin("final_layer.linear", 64).lin("final_layer.adaLN_modulation.1", H, 256)
    return k, keep


def z_image(n: int = 2):
    return nextdit(2560, n)


def lumina2(n: int = 2):
    return nextdit(2304, n)


def ltxv(n: int = 2):
    k = Keys().lin("patchify_proj", H, 128).lin("adaln_single.emb.timestep_embedder.linear_1", H, 256)
    k.lin("adaln_single.emb.timestep_embedder.linear_2").lin("adaln_single.linear", 6 * H)
    k.lin("caption_projection.linear_1", H, 4096).lin("caption_projection.linear_2")
    for i in range(n):
        b = f"transformer_blocks.{i}"
        for a in ("attn1", "attn2"):
            for x in ("to_q", "to_k", "to_v", "to_out.0"):
                k.lin(f"{b}.{a}.{x}")
            k.vec(f"{b}.{a}.q_norm.weight").vec(f"{b}.{a}.k_norm.weight")
        k.lin(f"{b}.ff.net.0.proj", 4 * H).lin(f"{b}.ff.net.2", H, 4 * H)
        k[f"{b}.scale_shift_table"] = (6, H)
    k["scale_shift_table"] = (2, H)
    k.lin("proj_out", 128)
    keep = {"patchify_proj", "adaln_single.emb.timestep_embedder.linear_1",
            "adaln_single.emb.timestep_embedder.linear_2", "adaln_single.linear", "caption_projection.linear_1",
            "caption_projection.linear_2", "proj_out"}
    return k, keep


def t5xxl(n: int = 3):
    k = Keys()
    k["shared.weight"] = (320, H)
    keep = {"shared", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"}
    for i in range(n):
        b = f"encoder.block.{i}.layer"
        for x in ("q", "k", "v", "o"):
            k.lin(f"{b}.0.SelfAttention.{x}", bias=False)
        if i == 0:
            k[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = (32, 8)
        k.vec(f"{b}.0.layer_norm.weight").vec(f"{b}.1.layer_norm.weight")
        k.lin(f"{b}.1.DenseReluDense.wi_0", 4 * H, bias=False).lin(f"{b}.1.DenseReluDense.wi_1", 4 * H, bias=False)
        k.lin(f"{b}.1.DenseReluDense.wo", H, 4 * H, bias=False)
        keep.add(f"{b}.1.DenseReluDense.wo")
    k.vec("encoder.final_layer_norm.weight")
    return k, keep


def clip(width: int, n: int = 2):
    k = Keys()
    k["text_model.embeddings.token_embedding.weight"] = (64, width)
    k["text_model.embeddings.position_embedding.weight"] = (77, width)
    for i in range(n):
        b = f"text_model.encoder.layers.{i}"
        for x in ("q_proj", "k_proj", "v_proj", "out_proj"):
            k.lin(f"{b}.self_attn.{x}", width, width)
        k.lin(f"{b}.mlp.fc1", 4 * width, width).lin(f"{b}.mlp.fc2", width, 4 * width)
        k.vec(f"{b}.layer_norm1.weight", width).vec(f"{b}.layer_norm2.weight", width)
    k.vec("text_model.final_layer_norm.weight", width)
    k.lin("text_projection", width, width, bias=False)
    return k, {"text_model.embeddings.token_embedding", "text_model.embeddings.position_embedding", "text_projection"}


def clip_l():
    return clip(768)


def clip_g():
    return clip(1280)


def llm(kind: str, n: int = 2):
    k = Keys()
    k["model.embed_tokens.weight"] = (256, H)
    for i in range(n):
        b = f"model.layers.{i}"
        for x in ("q_proj", "k_proj", "v_proj"):
            k.lin(f"{b}.self_attn.{x}", bias=kind == "qwen2")
        k.lin(f"{b}.self_attn.o_proj", bias=False)
        for x in ("gate_proj", "up_proj"):
            k.lin(f"{b}.mlp.{x}", 3 * H, bias=False)
        k.lin(f"{b}.mlp.down_proj", H, 3 * H, bias=False)
        k.vec(f"{b}.input_layernorm.weight").vec(f"{b}.post_attention_layernorm.weight")
        if kind == "qwen3":
            k.vec(f"{b}.self_attn.q_norm.weight", 16).vec(f"{b}.self_attn.k_norm.weight", 16)
        if kind == "gemma":
            k.vec(f"{b}.pre_feedforward_layernorm.weight").vec(f"{b}.post_feedforward_layernorm.weight")
    k.vec("model.norm.weight")
    k.lin("lm_head", 256, H, bias=False)
    return k, {"model.embed_tokens", "lm_head"}


# family name -> builder
BUILDERS = {
    "flux1": flux1, "flux2": flux2, "chroma": chroma, "sd3": sd3, "sdxl": sdxl, "wan": wan,
    "hunyuan-video": hunyuan_video, "qwen-image": qwen_image, "z-image": z_image, "lumina2": lumina2,
    "ltxv": ltxv, "t5xxl": t5xxl, "clip-l": clip_l, "clip-g": clip_g,
    "llama": lambda: llm("llama"), "qwen2": lambda: llm("qwen2"), "qwen3": lambda: llm("qwen3"),
    "gemma": lambda: llm("gemma"),
}
