"""What SD3/SD3.5 and FLUX.1 share: a transformer denoiser over image tokens with joint (MMDiT) attention, CLIP
text encoders beside a T5 encoder, a 16-channel-style VAE with a shift factor, and the flow-matching objective
(``flow_matching.py``).

Text: the CLIP tokenizers read 77 tokens and their pipelines cut longer prompts (CLIP only gives the pooled
vector and, for SD3, the first 77 sequence rows); T5 reads ``max_sequence_length`` tokens (``training.
max_sequence_length``; pipeline defaults FLUX 512, SD3 256, or the T5 tokenizer's ``model_max_length`` when
shorter: a model trained with a short window), and a prompt longer than that is an error here, where the
pipelines would cut it. Every generation in the toolkit passes the window (``call_defaults``), since a plain
pipeline call would pad to its own default. T5's weights never train: text-encoder LoRA and SPL act on the CLIPs, learned
tokens too unless ``training.learn_tokens_in_t5`` gives them a T5 row as well.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import ModelFamily, tokenizer_name
from .flow_matching import FlowMatchingObjective
from .sd import device_of  # noqa: F401 -- re-exported for flux.py / sd3.py


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the model in .module


class TransformerFamily(ModelFamily):
    denoiser_name = "transformer"
    t5_name = ""  # the T5 encoder's component name
    default_max_sequence_length = 256
    default_timestep_sampling = "uniform"
    latent_patch = 1  # latent pixels per image token side (FLUX packs 2x2; SD3: the transformer's patch size)

    def default_t5_window(self, t5_tokenizer) -> int:
        """The pipeline's default window, or the T5 tokenizer's own ``model_max_length`` when that is shorter (a
        model trained with a short window, as the toy world's FLUX, reads prompts padded to it)."""
        own = getattr(t5_tokenizer, "model_max_length", None) or self.default_max_sequence_length
        return min(self.default_max_sequence_length, own)

    def max_sequence_length(self, components) -> int:
        return components.extras.get("max_sequence_length") or self.default_t5_window(
            getattr(components, tokenizer_name(self.t5_name), None))

    def pipeline_call_kwargs(self, components) -> dict:
        return {"max_sequence_length": self.max_sequence_length(components)}

    def tokenize(self, components, prompts: list[str]) -> list[torch.Tensor]:
        """CLIP ids at 77 (cut as the pipelines cut them), T5 ids at ``max_sequence_length`` (longer: an error)."""
        from ..models.tokenizer import check_prompt_length

        t5_length = self.max_sequence_length(components)
        t5 = getattr(components, tokenizer_name(self.t5_name), None)
        ids = []
        for name, tokenizer in zip(components.text_encoder_names, components.tokenizers):
            is_t5 = name == self.t5_name
            length = t5_length if is_t5 else tokenizer.model_max_length
            if is_t5 or t5 is None:  # without T5 the CLIP window is the only one
                for prompt in prompts:
                    check_prompt_length(prompt, [tokenizer], limit=length)
            ids.append(tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                 return_tensors="pt").input_ids if prompts else torch.zeros(0, length, dtype=torch.long))
        return ids

    def prompt_windows(self, pipe) -> list[tuple[object, int]]:
        """T5's window (the pipeline cuts CLIP's at 77 by design: it only gives the pooled vector and the first rows)."""
        t5 = getattr(pipe, tokenizer_name(self.t5_name), None)
        if t5 is None:
            return super().prompt_windows(pipe)
        return [(t5, self.t5_window_of(pipe))]

    def t5_window_of(self, pipe) -> int:
        """The T5 window a loaded pipeline generates with: its result's trained one, else the default."""
        record = getattr(pipe, "_t2i_personal_record", None) or {}
        return record.get("resolved", {}).get("max_sequence_length") or self.default_t5_window(
            getattr(pipe, tokenizer_name(self.t5_name), None))

    def call_defaults(self, pipe) -> dict:
        if getattr(pipe, tokenizer_name(self.t5_name), None) is None:
            return {}
        return {"max_sequence_length": self.t5_window_of(pipe)}

    def objective(self, components, training) -> FlowMatchingObjective:
        fm = training.flow_matching
        return FlowMatchingObjective(
            components.scheduler.config, timestep_sampling=fm.timestep_sampling or self.default_timestep_sampling,
            logit_mean=fm.logit_mean, logit_std=fm.logit_std, mode_scale=fm.mode_scale,
            loss_weighting=fm.loss_weighting or "none", precondition_outputs=fm.precondition_outputs,
            shift=fm.shift, patch_size=self.latent_patch_of(components.denoiser))

    def latent_patch_of(self, denoiser) -> int:
        return self.latent_patch

    def pixel_multiple(self, components) -> int:
        return components.vae_scale_factor * self.latent_patch_of(components.denoiser)

    def check_training(self, training) -> None:
        if training.attention == "xformers":
            raise ConfigError(f"training.attention 'xformers': {self.name}'s joint-attention processors use PyTorch's "
                              "scaled_dot_product_attention (flash / memory-efficient kernels on a GPU); use attention: auto")
        if training.prediction_type or training.snr_gamma is not None or training.noise_offset:
            raise ConfigError(f"training.prediction_type, snr_gamma and noise_offset are DDPM options; {self.name} "
                              "models train with flow matching: use training.flow_matching.* instead")

    def claims_denoiser(self, denoiser) -> bool:
        return type(unwrapped(denoiser)).__name__ == self.transformer_class_name

    def self_attention_names(self, denoiser) -> list[str]:
        return [name for name, module in denoiser.named_modules() if name.endswith(".attn")]

    def cross_attention_modules(self, denoiser) -> dict[str, torch.nn.Module]:
        raise ConfigError(f"{self.name} models have no separate cross-attention: text and image tokens share joint "
                          "attention (see text_kv_projections)")

    def text_kv_projections(self, denoiser) -> dict[str, torch.nn.Module]:
        return {name: module for name, module in unwrapped(denoiser).named_modules()
                if name.endswith(("attn.add_k_proj", "attn.add_v_proj"))}

    # ------------------------------------------------------------------ single files (original layout)

    def load_transformer_file(self, path, config_dir, dtype):
        """The transformer of an original-layout file (``models/*_single_file.py``)."""
        raise NotImplementedError

    def save_transformer_file(self, transformer, path, dtype, metadata) -> None:
        raise NotImplementedError

    def from_single_file(self, path, cfg, dtype):
        """The transformer from an original-layout file (FLUX.1 ships transformer-only files; a full SD3 checkpoint
        also holds the rest, which is read from ``model.config_dir`` all the same) and every other component
        from ``model.config_dir``, a diffusers folder of the same variant."""
        from ..errors import ModelLoadError

        if not cfg.config_dir:
            raise ModelLoadError(f"{path} is a {self.name} single file: set model.config_dir to the diffusers folder of "
                                 "the same model variant (its VAE, text encoders and tokenizers are used)")
        try:
            transformer = self.load_transformer_file(path, cfg.config_dir, dtype)
            return self.pipeline_class.from_pretrained(cfg.config_dir, transformer=transformer, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load {path} with model.config_dir {cfg.config_dir}: {exc}") from exc

    def save_single_file(self, components, path, dtype, metadata) -> None:
        """The transformer alone in the original layout (what ComfyUI / Forge load beside the shipped VAE and
        text encoders)."""
        self.save_transformer_file(components.transformer, path, dtype, metadata)

    # ------------------------------------------------------------------ tiny models

    def _tiny_encoders(self, spec: dict, seed: int) -> dict:
        """Seeded CLIP encoder(s) and a T5 encoder from a ``models/configs/tiny-*.json`` spec."""
        import transformers

        from ..models.t5_tokenizer import build_t5_tokenizer
        from ..models.tiny import seeded, tokenizer_from_spec

        built = {}
        for i, name in enumerate(self.text_encoder_names):
            config = dict(spec[name])
            cls = getattr(transformers, config.pop("_class_name"))
            tokenizer = tokenizer_name(name)
            if name == self.t5_name:
                built[tokenizer] = build_t5_tokenizer()
                config.setdefault("vocab_size", len(built[tokenizer]))
                if config["vocab_size"] < len(built[tokenizer]):
                    raise ValueError(f"{name}: vocab_size {config['vocab_size']} < the T5 tokenizer's {len(built[tokenizer])}")
                config_cls = transformers.T5Config
            else:
                built[tokenizer] = tokenizer_from_spec(spec, f"{tokenizer}_pad_token")
                config_cls = transformers.CLIPTextConfig
            built[name] = seeded(seed + 2 + i, lambda: cls(config_cls(**config)))
        return built
