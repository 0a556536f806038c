"""FLUX.1 LoRA, diffusers/peft layout -> kohya ("sd-scripts", ComfyUI) layout.

The kohya layout names modules after FLUX's original (Black Forest Labs) code, where some diffusers modules are one
fused linear: a double block's ``img_attn_qkv`` is ``to_q, to_k, to_v`` stacked on the output axis (``txt_attn_qkv``
likewise for ``add_{q,k,v}_proj``), and a single block's ``linear1`` is ``to_q, to_k, to_v, proj_mlp``.

A fused module gets one block-diagonal LoRA: ``lora_down`` is the parts' downs concatenated (rank k*r), ``lora_up``
puts each part's up on the diagonal, and ``alpha`` is k*alpha so the scale stays alpha/r. Then ``up @ down`` is the
parts' deltas stacked, exactly: nothing is refit or truncated. A part without a LoRA gets zero rows and a zero
block. This is the "sparse" layout diffusers' ``_convert_kohya_flux_lora_to_diffusers`` detects and splits back.

Keys: ``lora_unet_<original name>`` and ``lora_te1_<CLIP-L name>`` (dots -> underscores), each with
``.lora_down.weight``, ``.lora_up.weight`` and a 0-d ``.alpha``. A module the layout has no name for raises. The
final layer gets its scale folded into ``lora_up`` (alpha = rank), since diffusers' converter ignores alpha there.
"""

from __future__ import annotations

import re

import torch

MLP_RATIO = 4  # FLUX's single-block MLP width / model width (sizes the zero block of a proj_mlp without LoRA)

# Inside transformer_blocks.{i}: diffusers module -> (original name, part, number of fused parts).
DOUBLE_BLOCK_NAMES = {
    "attn.to_q": ("img_attn_qkv", 0, 3),
    "attn.to_k": ("img_attn_qkv", 1, 3),
    "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1),
    "ff.net.0.proj": ("img_mlp_0", 0, 1),
    "ff.net.2": ("img_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3),
    "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1),
    "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1_context.linear": ("txt_mod_lin", 0, 1),
}
# Inside single_transformer_blocks.{i}.
SINGLE_BLOCK_NAMES = {
    "attn.to_q": ("linear1", 0, 4),
    "attn.to_k": ("linear1", 1, 4),
    "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4),
    "proj_out": ("linear2", 0, 1),
    "norm.linear": ("modulation_lin", 0, 1),
}
# Outside the blocks.
TOP_LEVEL_NAMES = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "norm_out.linear": "final_layer_adaLN_modulation_1",
    "proj_out": "final_layer_linear",
}
FINAL_LAYER = ("lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1")
# transformers 5 dropped CLIPTextModel's ``text_model.`` wrapper; kohya names keep it.
CLIP_MODULE = re.compile(r"(text_model\.)?(?P<body>encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]))")


def kohya_name(component: str, module: str) -> tuple[str, int, int]:
    """(kohya module name, part, number of fused parts) for a diffusers module of a FLUX.1 pipeline component."""
    if component == "transformer":
        if match := re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.(.+)", module):
            single, index, inner = match.groups()
            table, block = (SINGLE_BLOCK_NAMES, "single_blocks") if single else (DOUBLE_BLOCK_NAMES, "double_blocks")
            if inner in table:
                name, part, parts = table[inner]
                return f"lora_unet_{block}_{index}_{name}", part, parts
        elif module in TOP_LEVEL_NAMES:
            return f"lora_unet_{TOP_LEVEL_NAMES[module]}", 0, 1
    elif component == "text_encoder":
        if match := CLIP_MODULE.fullmatch(module):
            return "lora_te1_text_model_" + match["body"].replace(".", "_"), 0, 1
    else:
        raise ValueError(
            f"LoRA on component {component!r} ({component}.{module}): the kohya FLUX layout holds LoRAs for "
            "'transformer' and 'text_encoder' (CLIP-L) only (FLUX's T5 text_encoder_2 takes none)"
        )
    raise ValueError(f"the kohya FLUX layout has no name for the LoRA module {component}.{module}")


def flux_lora_to_kohya(peft_state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A FLUX.1 LoRA as ``get_peft_model_state_dict`` returns it, keys prefixed ``transformer.`` / ``text_encoder.``,
    all LoRAs with scale ``alpha / rank`` -> the kohya layout (see the module docstring)."""
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")

    # (component, diffusers module) -> {"lora_A": down, "lora_B": up}
    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state.items():
        match = re.fullmatch(r"([^.]+)\.(.+)\.(lora_A|lora_B)\.weight", key)
        if not match:
            raise ValueError(f"not a LoRA weight of a FLUX.1 component: {key!r}")
        component, module, which = match.groups()
        if tensor.ndim != 2:
            raise ValueError(f"{key!r}: expected a 2-D linear LoRA weight, got shape {tuple(tensor.shape)}")
        modules.setdefault((component, module), {})[which] = tensor

    # kohya module -> its parts (one per diffusers module; None where a fused part has no LoRA)
    fused: dict[str, list] = {}
    for (component, module), pair in modules.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise ValueError(f"{component}.{module} has no {missing}.weight")
        down, up = pair["lora_A"], pair["lora_B"]
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"{component}.{module}: lora_B {tuple(up.shape)} does not fit lora_A {tuple(down.shape)}")
        name, part, parts = kohya_name(component, module)
        fused.setdefault(name, [None] * parts)[part] = (down, up, f"{component}.{module}")

    kohya: dict[str, torch.Tensor] = {}
    for name, parts in fused.items():
        if len(parts) == 1:
            down, up, _ = parts[0]
            down, up, kohya_alpha = down.detach().clone(), up.detach().clone(), alpha
            if name in FINAL_LAYER:  # diffusers' converter ignores alpha here: fold the scale into up, alpha = rank
                up, kohya_alpha = up * (alpha / down.shape[0]), down.shape[0]
            if name == FINAL_LAYER[1]:  # FLUX's final modulation outputs (shift, scale), diffusers' (scale, shift)
                up = torch.cat(up.chunk(2)[::-1])
        else:
            down, up = block_diagonal(name, parts)
            kohya_alpha = alpha * len(parts)
        kohya[f"{name}.lora_down.weight"] = down.contiguous()
        kohya[f"{name}.lora_up.weight"] = up.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(kohya_alpha))
    return kohya


def block_diagonal(name: str, parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA for the fused module ``name`` from its parts' (down, up, source) or None: downs stacked, ups on the
    diagonal, zeros for a part without a LoRA."""
    present = [p for p in parts if p is not None]
    rank, in_features = present[0][0].shape
    like = present[0][0]
    for down, up, source in present:
        if down.shape != (rank, in_features):
            raise ValueError(
                f"{name}: the fused parts need one rank and input width; {source} has lora_A {tuple(down.shape)}, "
                f"{present[0][2]} {(rank, in_features)}"
            )
    # FLUX's fused parts are model-wide (q, k, v), plus MLP_RATIO x model-wide (the single blocks' proj_mlp).
    widths = [in_features] * 3 + [MLP_RATIO * in_features] * (len(parts) - 3)
    downs, ups = [], []
    for part, width in zip(parts, widths):
        if part is None:
            downs.append(like.new_zeros(rank, in_features))
            ups.append(like.new_zeros(width, rank))
            continue
        down, up, source = part
        if up.shape[0] != width:
            raise ValueError(f"{name}: {source} outputs {up.shape[0]} features, FLUX's layout expects {width}")
        downs.append(down.detach())
        ups.append(up.detach())
    return torch.cat(downs), torch.block_diag(*ups)
