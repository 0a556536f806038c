"""A quantized frozen denoiser for LoRA training (QLoRA, Dettmers et al., 2023): the base weights are stored in
4-bit NF4 or 8-bit and dequantized on the fly, while the LoRA factors train in full precision on top.

``model.quantize``:

* ``nf4``: bitsandbytes ``Linear4bit`` (NF4 with double quantization, the QLoRA recipe), compute in the training
  dtype; FLUX.1-dev's 12B transformer drops from ~24 GB (bf16) to ~7 GB;
* ``int8``: bitsandbytes ``Linear8bitLt`` (LLM.int8(), outlier threshold 6.0);
* ``torchao_int8``: torchao's int8 weight-only quantization (needs ``pip install torchao``).

Only the linear layers inside the denoiser's transformer blocks whose inputs come in whole blocks of 64 are quantized (every one in the real models) (in SD/SDXL UNets, their attention
and feed-forward layers; in SD3/FLUX, every joint and single block): they hold nearly all the weights, while the
embedders, norms and output layers are small and sensitive, as ai-toolkit and kohya also keep them. peft wraps
the quantized layers with LoRA (its bitsandbytes / torchao LoRA layers). Quantization is deterministic, so exact
resume holds. At inference the LoRA is applied to the unquantized base, as QLoRA adapters usually are.
"""

from __future__ import annotations

import importlib.util

import torch

from ..errors import ConfigError

QUANTIZATIONS = ("none", "nf4", "int8", "torchao_int8")


def check_quantization_available(kind: str) -> None:
    package = "torchao" if kind == "torchao_int8" else "bitsandbytes"
    if kind != "none" and importlib.util.find_spec(package) is None:
        extra = "pip install torchao" if package == "torchao" else "pip install 't2i-personal[bnb]'"
        raise ConfigError(f"model.quantize is {kind!r}, which needs {package}: {extra}, or set model.quantize: none")


BLOCK = 64  # bitsandbytes quantizes in blocks of 64 inputs; its CPU kernel needs whole blocks per row


def quantizable_linears(denoiser: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in denoiser.named_modules()
            if type(m) is torch.nn.Linear and "transformer_blocks." in name and m.in_features % BLOCK == 0}


def quantize_frozen(denoiser: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Quantize ``denoiser``'s block linears in place (call before LoRA is added); returns how many."""
    check_quantization_available(kind)
    linears = quantizable_linears(denoiser)
    if kind == "none" or not linears:
        return 0
    if kind == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        names = set(linears)
        quantize_(denoiser, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in names)
        return len(linears)
    for name, linear in linears.items():
        parent_name, _, child = name.rpartition(".")
        denoiser.get_submodule(parent_name).register_module(child, _bnb_linear(linear, kind, compute_dtype))
    return len(linears)


def _bnb_linear(linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    weight, device = linear.weight.data.float(), linear.weight.device
    bias = linear.bias is not None
    if kind == "nf4":
        quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                      quant_type="nf4", compress_statistics=True)
        quantized.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
    else:
        quantized = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                        threshold=6.0)
        quantized.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False)
    if bias:
        quantized.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return quantized.to(device)  # bitsandbytes quantizes on the move to a device
