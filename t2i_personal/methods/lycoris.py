"""LoHa and LoKr adapters (the LyCORIS family, through peft): ``method.adapter: loha | lokr``.

For a frozen weight W (out × in) and ``method.lora`` rank r and alpha α:

    LoHa (Hyeon-Woo et al., 2022, FedPara):  ΔW = (A₁B₁) ⊙ (A₂B₂) · α/r,    A_i: out × r, B_i: r × in
    LoKr (Yeh et al., 2024, LyCORIS):         ΔW = W₁ ⊗ W₂ · s,             W₂ possibly factored as W₂ₐW₂ᵦ (rank r)

peft's layers name their factors as LyCORIS does (``hada_w1_a`` … ``lokr_w2_b``), so the exports are:

* ``pytorch_lycoris_weights.safetensors``: peft's keys per component (``unet.….hada_w1_a``) with each component's
  peft config in the metadata: what :func:`load_into` reads back (diffusers has no LoHa/LoKr loader);
* ``pytorch_lycoris_weights_kohya.safetensors``: the LyCORIS / kohya names that ComfyUI and A1111 read
  (``lora_unet_<module>.hada_w1_a``, ``.alpha``), for the UNet families. Scales as those tools apply them: LoHa
  α/r; LoKr α/r when a factor is low-rank, else 1, so a LoKr whose factors are both full gets peft's α/r folded
  into ``lokr_w1``. FLUX's kohya layout fuses projections, which Hadamard and Kronecker products cannot be fused
  into, so the transformer families get the peft file only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LYCORIS_WEIGHTS = "pytorch_lycoris_weights.safetensors"
LYCORIS_KOHYA_WEIGHTS = "pytorch_lycoris_weights_kohya.safetensors"
KINDS = ("loha", "lokr")


def adapter_config(kind: str, rank: int, alpha: float, targets: list[str]):
    from peft import LoHaConfig, LoKrConfig

    config_class = {"loha": LoHaConfig, "lokr": LoKrConfig}[kind]
    return config_class(r=rank, alpha=alpha, target_modules=targets, init_weights=True)


def save(components, trained: list[str], out_dir: Path, dtype: torch.dtype, kohya: bool, kind: str) -> dict:
    """Write the adapter files; their description for personalization.json."""
    from peft.utils import get_peft_model_state_dict

    state, metadata = {}, {"format": "pt", "adapter": kind}
    for name in trained:
        module = getattr(components, name)
        state |= {f"{name}.{k}": v.detach().to("cpu", dtype).contiguous()
                  for k, v in get_peft_model_state_dict(module).items()}
        metadata[f"{name}_config"] = json.dumps(module.peft_config["default"].to_dict(), default=list)
    save_file(state, str(out_dir / LYCORIS_WEIGHTS), metadata=metadata)
    artifact = {"type": kind, "path": LYCORIS_WEIGHTS}
    if kohya and components.family.denoiser_name == "unet":
        save_file(kohya_state(components, trained, kind, dtype), str(out_dir / LYCORIS_KOHYA_WEIGHTS),
                  metadata={"format": "pt", "ss_network_module": f"lycoris.kohya ({kind})",
                            "ss_base_model": components.source})
        artifact["kohya_path"] = LYCORIS_KOHYA_WEIGHTS
    return artifact


def kohya_state(components, trained: list[str], kind: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LyCORIS / kohya keys: each adapted module's name as kohya writes it for a LoRA, LyCORIS' factor names."""
    from diffusers.utils import convert_state_dict_to_kohya

    out = {}
    for name in trained:
        for path, layer in getattr(components, name).named_modules():
            if not hasattr(layer, "scaling") or "default" not in getattr(layer, "scaling", {}):
                continue
            probe = convert_state_dict_to_kohya({f"{name}.{path}.lora_A.weight": torch.zeros(1)})
            prefix = components.family.kohya_lora_key(next(iter(probe)).rsplit(".", 2)[0])
            factors = {key: p.detach().float() for key, p in _factors(layer).items()}
            rank = layer.r["default"]
            alpha = layer.alpha["default"] if hasattr(layer, "alpha") else layer.scaling["default"] * rank
            low_rank = any(k.endswith(("_a", "_b")) for k in factors)
            if kind == "lokr" and not low_rank:  # ComfyUI / LyCORIS apply no α/r then: fold peft's scale in
                factors["lokr_w1"] = factors["lokr_w1"] * layer.scaling["default"]
            for key, value in factors.items():
                out[f"{prefix}.{key}"] = value.to(dtype).contiguous()
            out[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    return out


def _factors(layer) -> dict[str, torch.Tensor]:
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
             "lokr_w2_a", "lokr_w2_b")
    return {n: getattr(layer, n)["default"] for n in names if hasattr(layer, n) and "default" in getattr(layer, n)}


def load_into(pipeline, folder: Path, artifact: dict):
    """Inject the saved adapters into a base pipeline's modules (peft) and load their factors."""
    from peft import LoHaConfig, LoKrConfig
    from peft.utils import set_peft_model_state_dict

    path = folder / artifact["path"]
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    config_class = {"loha": LoHaConfig, "lokr": LoKrConfig}[artifact["type"]]
    for name in sorted({k.split(".", 1)[0] for k in state}):
        module = getattr(pipeline, name)
        config = config_class(**{k: v for k, v in json.loads(metadata[f"{name}_config"]).items()
                                 if k in config_class.__dataclass_fields__ and k != "peft_type"})
        module.add_adapter(config)
        own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        result = set_peft_model_state_dict(module, own)
        missing = [k for k in getattr(result, "missing_keys", []) if "hada_" in k or "lokr_" in k]
        if missing:
            raise ValueError(f"{path}: {len(missing)} adapter tensors of {name} were not loaded (e.g. {missing[0]})")
    return pipeline
