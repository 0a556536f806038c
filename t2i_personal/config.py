"""Validated run configuration: YAML presets plus dotted ``key.sub=value`` overrides.

Each concern has its own small section class; unknown keys fail with the nearest valid key, and options that
contradict each other fail once, here, before any file is written.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .methods.classdiffusion import SPLConfig
from .methods.custom_diffusion import CustomDiffusionConfig
from .methods.dreambooth import DreamBoothConfig, LoraConfig
from .methods.styleforge import StyleForgeConfig
from .sections import Section

LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
)


class ModelConfig(Section):
    pretrained: str = Field("builtin:tiny-sd", description="hub id, local diffusers folder, single .safetensors file or builtin:NAME")
    family: str = Field("auto", description="auto (recognised from the model) or a family name: sd, sdxl, sd3, flux")
    config_dir: str | None = Field(None, description="single-file checkpoints: local diffusers folder (or hub id) holding the architecture configs")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    variant: str | None = Field(None, description="weights variant, e.g. fp16")
    allow_pickle: bool = Field(False, description="allow .bin/.ckpt/.pt weights (pickle can run code: only for files you trust)")
    quantize: Literal["none", "nf4", "int8", "torchao_int8"] = Field("none", description="LoRA training on a quantized frozen denoiser (QLoRA): nf4 / int8 via bitsandbytes, torchao_int8 via torchao")


    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        from .families import FAMILIES

        if value != "auto" and value not in FAMILIES:
            raise ValueError(f"unknown model family {value!r}; use auto or one of {', '.join(sorted(FAMILIES))}")
        return value


class ConceptConfig(Section):
    identifier: str = Field(..., description="rare token that names the subject, e.g. 'sks'")
    class_noun: str = Field(..., description="what the subject is, e.g. 'dog'")
    instance_dir: str | list[str] = Field(..., description="folder (or list of folders) of 3-20 photos; an optional .txt next to an image is its caption ({V}/{C} allowed)")
    initializer_token: str | None = Field(None, description="learn the identifier as a new token (e.g. '<new1>') whose embedding starts from this word's (textual inversion; Custom Diffusion's modifier token)")
    instance_prompt: str = Field("a photo of {V} {C}", description="{V} = identifier, {C} = class noun")
    class_prompt: str = Field("a photo of {C}", description="prompt of the prior samples")
    class_dir: str | None = Field(None, description="class (prior) images; missing ones are generated into it (prior: auxiliary uses it as given)")
    num_class_images: int = Field(100, ge=1, description="prior: class_images uses (and generates up to) this many")

    @field_validator("identifier", "class_noun")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _learned_token_is_one_word(self) -> "ConceptConfig":
        if self.initializer_token is not None and (not self.identifier or any(ch.isspace() for ch in self.identifier)):
            raise ValueError(f"identifier {self.identifier!r} becomes one learned token (initializer_token is set), so it "
                             "cannot contain spaces; use e.g. '<new1>'")
        return self

    @field_validator("instance_dir")
    @classmethod
    def _some_folder(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("the list of instance folders is empty: give at least one folder of images")
        return value

    @property
    def instance_dirs(self) -> list[str]:
        return [self.instance_dir] if isinstance(self.instance_dir, str) else list(self.instance_dir)


# Each method owns its section (in its module); ``method.name`` chooses which one validates ``method``.
METHOD_SECTIONS = (DreamBoothConfig, CustomDiffusionConfig, StyleForgeConfig)
MethodConfig = Annotated[Union[METHOD_SECTIONS], Field(discriminator="name")]


def method_config(**values) -> DreamBoothConfig | CustomDiffusionConfig | StyleForgeConfig:
    """The validated ``method`` section for ``values`` (``name`` defaults to dreambooth)."""
    return TypeAdapter(MethodConfig).validate_python({"name": "dreambooth", **values})


class DataConfig(Section):
    resolution: int = Field(512, ge=8, description="square training size in pixels (multiple of 8)")
    center_crop: bool = Field(True, description="center crop after resizing (false: random crop)")
    random_flip: bool = Field(False, description="horizontal flip with probability 0.5")
    buckets: bool = Field(False, description="aspect-ratio buckets: each image is cut to the nearest of a set of sizes with about resolution^2 pixels (aspect 1:2 to 2:1) instead of a square; a micro-batch holds one bucket")
    bucket_step: int | None = Field(None, ge=8, description="bucket sides step by this many pixels; null: about resolution/16 on the model's pixel grid")
    masks: Literal["none", "files", "alpha"] = Field("none", description="masked loss on instance images: files (img.mask.png beside img.png, white = subject) or alpha (the image's alpha channel); prior samples are never masked")
    mask_background_weight: float = Field(0.0, ge=0.0, le=1.0, description="with data.masks: the loss weight outside the subject (0: subject only)")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="probability of training an instance image that has a caption file with the bare instance prompt instead")
    rescale_augmentation: bool = Field(False, description="Custom Diffusion's random rescale onto a blank canvas with a loss mask and 'far away'/'zoomed in' prompt prefixes (instance images only)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    max_image_pixels: int = Field(64_000_000, ge=1, description="larger images are refused (decompression bombs)")
    class_generation_steps: int = Field(25, ge=1, description="sampling steps for generated class images")
    class_generation_guidance: float = Field(7.5, description="CFG scale for generated class images")
    class_generation_batch_size: int = Field(4, ge=1, description="images per generation batch")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (the VAE downsamples by 8); try {value - value % 8 or 8}")
        return value


class ValidationConfig(Section):
    prompts: list[str] = Field(default_factory=list, description="{V}/{C} are the first concept; {V1}/{C1}, {V2}/{C2}, ... each concept")
    negative_prompt: str | None = Field(None, description="negative prompt for validation images")
    every_n_steps: int = Field(100, ge=1, description="validation grid every N steps (and at the end)")
    num_images_per_prompt: int = Field(2, ge=1, description="grid columns")
    num_inference_steps: int = Field(25, ge=1, description="sampling steps")
    guidance_scale: float | None = Field(None, description="CFG scale (FLUX.1-dev: its embedded guidance); null: the family's default (SD/SDXL 7.5, SD3 7.0, FLUX 3.5)")
    seed: int = Field(0, description="validation images use seeds seed, seed+1, ... per prompt")


class FlowMatchingConfig(Section):
    """``training.flow_matching``: the objective of the flow-matching families (SD3, FLUX); see
    ``families/flow_matching.py``. Unset keys take the family's default, as diffusers' scripts use them."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode"] | None = Field(None, description="how noise levels are drawn; null: the family's default (FLUX: uniform, SD3: logit_normal)")
    logit_mean: float = Field(0.0, description="logit_normal: mean")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: standard deviation")
    mode_scale: float = Field(1.29, description="mode sampling: scale (SD3 paper)")
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] | None = Field(None, description="per-sample loss weight; null: none")
    precondition_outputs: bool = Field(False, description="SD3's option: turn the output into an x0 estimate and regress x0")
    shift: float | Literal["resolution"] | None = Field(None, description="shift the drawn noise level: a number s (s*sigma/(1+(s-1)*sigma)), 'resolution' (FLUX's resolution-dependent shift) or null (the scheduler's own table)")

    @field_validator("shift")
    @classmethod
    def _positive_shift(cls, value: Any) -> Any:
        if isinstance(value, float) and value <= 0:
            raise ValueError("training.flow_matching.shift must be positive, 'resolution' or null")
        return value


class TrainingConfig(Section):
    output_dir: str = Field("outputs/run", description="results, checkpoints/, validation/, logs/")
    seed: int = Field(0, description="seeds data order, augmentation, noise, timesteps and adapter init")
    max_train_steps: int = Field(400, ge=1, description="optimizer steps")
    train_batch_size: int = Field(1, ge=1, description="instance images per step per process (prior samples are added)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    learning_rate: float = Field(5e-6, gt=0, description="UNet learning rate (use ~1e-4 for LoRA)")
    text_encoder_learning_rate: float | None = Field(None, gt=0, description="defaults to learning_rate")
    token_learning_rate: float | None = Field(None, gt=0, description="learned token embeddings; defaults to learning_rate")
    scale_lr: bool = Field(False, description="multiply learning rates by batch size x accumulation x processes")
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"  # type: ignore[valid-type]
    lr_warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    lr_num_cycles: int = Field(1, ge=1, description="cosine_with_restarts cycles")
    lr_power: float = Field(1.0, description="polynomial decay power")
    optimizer: Literal["adamw", "adamw_8bit", "adamw_8bit_if_available"] = Field("adamw", description="adamw_8bit needs bitsandbytes; adamw_8bit_if_available falls back to adamw (with a warning) without it")
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping (null: off)")
    ema: bool = Field(False, description="keep an exponential moving average of the trainable weights; validation images and exports use it")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay (warmed up as diffusers' EMAModel: at most (1+n)/(10+n) after n updates)")
    ema_update_every: int = Field(1, ge=1, description="update the EMA every N optimizer steps")
    ema_device: Literal["same", "cpu"] = Field("same", description="where the EMA lives: beside the weights, or on the CPU (saves GPU memory for full fine-tunes)")
    max_nonfinite_steps: int = Field(3, ge=0, description="a step whose loss or gradients are NaN/inf is skipped (weights untouched); after this many skipped steps the run stops with an error (0: at the first)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="trainable weights stay float32; frozen ones are cast")
    gradient_checkpointing: bool = Field(False, description="recompute activations: less memory, ~30% slower")
    attention: Literal["auto", "sdpa", "xformers"] = Field("auto", description="auto: xformers when installed on CUDA, else SDPA")
    allow_tf32: bool = Field(False, description="TF32 matmuls on Ampere+ GPUs")
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(None, description="default: the base model's scheduler")
    noise_offset: float = Field(0.0, ge=0, description="offset noise strength (0.05-0.1 helps very dark/bright images)")
    snr_gamma: float | None = Field(None, gt=0, description="min-SNR weighting; 5.0 is the paper's value")
    flow_matching: FlowMatchingConfig = FlowMatchingConfig()
    guidance_scale: float | None = Field(None, gt=0, description="guidance-distilled models (FLUX.1-dev): the guidance value trained with; null: 3.5 as diffusers' FLUX script (refused for models without a guidance input)")
    learn_tokens_in_t5: bool = Field(False, description="SD3/FLUX: learned tokens (initializer_token) also get a T5 row, as --enable_t5_ti in diffusers' advanced FLUX script; T5 then runs with gradients every step")
    max_sequence_length: int | None = Field(None, ge=1, description="T5's token window (SD3, FLUX) in training and validation; null: the pipeline's default (FLUX 512, SD3 256), or the T5 tokenizer's model_max_length when shorter (builtin:toy-flux: 32)")
    cache_latents: bool = Field(False, description="encode every image (and its flip) once; needs center_crop")
    cache_text_embeddings: bool = Field(False, description="encode every prompt once; not with train_text_encoder")
    offload_text_encoders: bool = Field(False, description="with cache_text_embeddings: the text encoders leave the GPU after caching (back only for validation); FLUX's T5-XXL alone is ~9 GB in bf16")
    checkpointing_steps: int = Field(500, ge=1, description="resumable checkpoint (with an inference artifact) every N steps")
    checkpoints_total_limit: int | None = Field(None, ge=1, description="keep only the newest N checkpoints")
    resume: str | None = Field(None, description="'latest' or a checkpoint folder")
    stop_after_step: int | None = Field(None, ge=1, description="stop early after this step's checkpoint (resumable)")
    report_to: Literal["tensorboard", "wandb", "none"] = Field("tensorboard", description="logs go to output_dir/logs")
    progress_bar: bool = Field(True, description="tqdm bar with the loss")


    def learning_rates(self, scale: float = 1.0) -> dict[str, float]:
        """The learning rate of each kind of parameter: the text encoder's and the learned tokens' default to
        ``learning_rate``; ``scale`` multiplies all (``scale_lr``)."""
        return {"denoiser": self.learning_rate * scale,
                "text_encoder": (self.text_encoder_learning_rate or self.learning_rate) * scale,
                "tokens": (self.token_learning_rate or self.learning_rate) * scale}

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads an unquoted `mixed_precision: no` as false


class ExportConfig(Section):
    kohya_lora: bool = Field(True, description="LoRA: also write an A1111/ComfyUI (kohya keys) file (SD, SDXL, FLUX; SD3 UIs read the diffusers file)")
    save_dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="dtype of exported weights")
    single_file: bool = Field(False, description="full fine-tunes: also write model.safetensors in the original "
                              "SD checkpoint layout (A1111 / ComfyUI)")
    inference_artifact_in_checkpoints: bool = Field(True, description="each checkpoint also holds inference/ (load_personalized works on it)")


class TrainConfig(Section):
    model: ModelConfig = ModelConfig()
    concepts: list[ConceptConfig] = Field(..., min_length=1)
    method: MethodConfig = Field(default_factory=DreamBoothConfig)
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    validation: ValidationConfig = ValidationConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="before")
    @classmethod
    def _dreambooth_by_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": "dreambooth", **data["method"]}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        m, t, d = self.method, self.training, self.data
        if t.cache_text_embeddings and m.train_text_encoder:
            raise ValueError("training.cache_text_embeddings cannot be used with method.train_text_encoder: "
                             "the embeddings change while the text encoder trains")
        if self.model.quantize != "none" and getattr(m, "adapter", None) != "lora":
            raise ValueError(f"model.quantize {self.model.quantize!r} freezes a quantized denoiser, which only a LoRA can "
                             "train on: set method.adapter: lora (method.name dreambooth or styleforge), or "
                             "model.quantize: none")
        if t.learn_tokens_in_t5 and not any(c.initializer_token for c in self.concepts):
            raise ValueError("training.learn_tokens_in_t5 is set but no concept has an initializer_token (nothing learns "
                             "a token)")
        if not t.ema and any(k in t.model_fields_set and getattr(t, k) != TrainingConfig.model_fields[k].default
                             for k in ("ema_decay", "ema_update_every", "ema_device")):
            raise ValueError("training.ema_decay / ema_update_every / ema_device are set but training.ema is false: "
                             "set training.ema: true or remove them")
        if d.buckets and d.rescale_augmentation:
            raise ValueError("data.buckets cannot be combined with data.rescale_augmentation (it rescales onto a square "
                             "canvas); turn one of them off")
        if d.bucket_step is not None and not d.buckets:
            raise ValueError("data.bucket_step is set but data.buckets is false: set data.buckets: true or remove it")
        if d.masks != "none" and d.rescale_augmentation:
            raise ValueError("data.masks cannot be combined with data.rescale_augmentation (it has its own loss mask); "
                             "turn one of them off")
        if d.masks == "none" and "mask_background_weight" in d.model_fields_set and d.mask_background_weight != 0.0:
            raise ValueError("data.mask_background_weight is set but data.masks is 'none': set data.masks: files or "
                             "alpha")
        if t.offload_text_encoders and not t.cache_text_embeddings:
            raise ValueError("training.offload_text_encoders needs training.cache_text_embeddings: true (without the "
                             "cache every step runs the text encoders)")
        if t.cache_latents and not d.center_crop:
            raise ValueError("training.cache_latents needs data.center_crop: true (a random crop gives a new latent every epoch)")
        if t.cache_latents and d.rescale_augmentation:
            raise ValueError("training.cache_latents cannot be used with data.rescale_augmentation: every sample draws a "
                             "new scale and position, so there is no fixed latent to cache; turn one of them off")
        if t.stop_after_step is not None and t.stop_after_step >= t.max_train_steps:
            raise ValueError(f"training.stop_after_step ({t.stop_after_step}) must be below training.max_train_steps ({t.max_train_steps})")
        if t.text_encoder_learning_rate is not None and not m.train_text_encoder:
            raise ValueError("training.text_encoder_learning_rate is set but method.train_text_encoder is false")
        identifiers = [c.identifier for c in self.concepts]
        if len(set(identifiers)) != len(identifiers):
            raise ValueError(f"concept identifiers must be distinct, got {identifiers}")
        learns_tokens = any(c.initializer_token for c in self.concepts)
        if t.token_learning_rate is not None and not learns_tokens:
            raise ValueError("training.token_learning_rate is set but no concept has an initializer_token (nothing learns a token)")
        if not (m.train_unet or m.train_text_encoder or learns_tokens):
            raise ValueError("nothing would train: set method.train_unet or method.train_text_encoder to true, or give a "
                             "concept an initializer_token to learn its identifier as a new token")
        if m.spl is not None and not (m.train_text_encoder or learns_tokens):
            raise ValueError("method.spl acts on the text side only (its gradient reaches learned token embeddings or "
                             "a trained text encoder, never the UNet), and nothing there trains: give the concepts an "
                             "initializer_token (e.g. identifier '<new1>', initializer_token 'dog') or set "
                             "method.train_text_encoder: true")
        if m.prior == "auxiliary":
            missing = [c.identifier for c in self.concepts if not c.class_dir]
            if missing:
                raise ValueError(f"method.prior 'auxiliary' trains the class prompt on images you supply, but concepts "
                                 f"{missing} have no class_dir: set concepts[].class_dir to the auxiliary image folder")
        if t.cache_text_embeddings and learns_tokens:
            raise ValueError("training.cache_text_embeddings cannot be used with learned tokens (initializer_token): "
                             "their embeddings change while training")
        return self


# ---------------------------------------------------------------- loading


def _section_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, tuple]:
    """The section class at ``loc`` (field names, list indices and, inside ``method``, the method's tag) and the
    path as the user writes it (without the tag)."""
    current: Any = model
    shown: list = []
    candidates: list = []
    for part in loc:
        if isinstance(part, int):
            shown.append(part)
            continue
        tagged = [c for c in candidates if "name" in c.model_fields and c.model_fields["name"].default == part]
        if tagged:  # a discriminated union names the chosen member in the location
            current, candidates = tagged[0], []
            continue
        field = current.model_fields.get(part) if current is not None else None
        shown.append(part)
        if field is None:
            current = None
            continue
        args = getattr(field.annotation, "__args__", ())
        candidates = [a for a in (field.annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = candidates[0] if candidates else None
    return current, tuple(shown)


def _suggest(model: type[BaseModel], loc: tuple, bad_key: str) -> str:
    """Nearest valid key for ``bad_key`` at ``loc`` (a path of field names and list indices)."""
    current, _ = _section_at(model, loc)
    if current is None:
        return ""
    close = difflib.get_close_matches(bad_key, list(current.model_fields), n=1, cutoff=0.5)
    valid = ", ".join(current.model_fields)
    return (f" Did you mean '{close[0]}'?" if close else "") + f" Valid keys here: {valid}."


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        _, shown = _section_at(TrainConfig, tuple(e["loc"]))
        path = ".".join(str(p) for p in shown)
        if e["type"] == "extra_forbidden":
            hint = _suggest(TrainConfig, tuple(e["loc"][:-1]), str(e["loc"][-1]))
            lines.append(f"  - unknown key '{path}'.{hint}")
        elif e["type"] == "missing":
            lines.append(f"  - '{path}' is required")
        elif e["type"] == "union_tag_invalid":
            tags = ", ".join(c.model_fields["name"].default for c in METHOD_SECTIONS)
            close = difflib.get_close_matches(str(e.get("input", {}).get("name") if isinstance(e.get("input"), dict) else ""),
                                              [c.model_fields["name"].default for c in METHOD_SECTIONS], n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - {path}.name: unknown method.{hint} Choose one of: {tags}")
        else:
            value = e.get("input")
            shown_value = repr(value) if not isinstance(value, dict) else "{...}"
            lines.append(f"  - {path or 'config'}: {e['msg']} (got {shown_value})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``training.learning_rate=1e-4`` -> (['training', 'learning_rate'], 1e-4); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value, e.g. training.max_train_steps=200")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override '{text}' has an empty key")
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    if not raw.strip():
        return path, None
    if raw.strip().lower() in {"yes", "no", "on", "off", "y", "n"}:
        return path, raw.strip()  # YAML 1.1 would read these as booleans: mixed_precision=no means "no"
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return path, raw  # e.g. "{V} {C} at the beach": not YAML, meant as text
    if isinstance(value, dict) and ("{V}" in raw or "{C}" in raw):
        return path, raw  # "{V}" alone parses as a YAML mapping; a prompt template is meant
    return path, value


def _apply(tree: dict, path: list[str | int], value: Any, original: str) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError(f"override '{original}': index {part} is out of range (list has {len(node)} items)")
            node = node[part]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last > len(node):
            raise ConfigError(f"override '{original}': index {last} is out of range")
        if last == len(node):
            node.append(value)
        else:
            node[last] = value
    else:
        node[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None) -> TrainConfig:
    """Read a YAML preset, apply dotted overrides, validate. Relative paths in the YAML stay relative to the CWD."""
    tree: dict = copy.deepcopy(base or {})
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            presets = sorted(p.name for p in path.glob("*.yaml"))[:6]
            raise ConfigError(f"--config {path} is a folder; give one YAML file" +
                              (f", e.g. {path / presets[0]} (here: {', '.join(presets)})" if presets else ""))
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must contain a mapping at the top level, got {type(loaded).__name__}")
        tree.update(loaded)
    for text in overrides or []:
        key_path, value = parse_override(text)
        _apply(tree, key_path, value, text)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def config_to_dict(config: TrainConfig) -> dict:
    return config.model_dump(mode="json")


def config_reference_markdown() -> str:
    """Every config key with its default and help text, as Markdown (the README's reference is generated from this)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    sections = [("model", ModelConfig), ("concepts[]", ConceptConfig), ("method", DreamBoothConfig),
                ("method", CustomDiffusionConfig), ("method", StyleForgeConfig), ("method.lora", LoraConfig),
                ("method.spl", SPLConfig), ("data", DataConfig), ("training", TrainingConfig),
                ("validation", ValidationConfig), ("export", ExportConfig)]
    listed = set()
    for prefix, cls in sections:
        method = cls.model_fields["name"].default if "name" in cls.model_fields and prefix == "method" else None
        for name, field in cls.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                continue
            default = "required" if field.is_required() else (
                "[]" if field.default_factory is not None else repr(field.default).replace("|", "\\|"))
            key = (prefix, name, default)
            if key in listed or (method and name == "name"):
                continue
            listed.add(key)
            help_text = (field.description or "").replace("|", "\\|")
            annotation = getattr(field.annotation, "__args__", None)
            if annotation and all(isinstance(a, str) for a in annotation):
                help_text = (help_text + " " if help_text else "") + "one of: " + ", ".join(annotation)
            where = f" (`{method}`)" if method and method != "dreambooth" else ""
            lines.append(f"| `{prefix}.{name}`{where} | `{default}` | {help_text} |")
    first_method_row = next(i for i, line in enumerate(lines) if line.startswith("| `method."))
    lines.insert(first_method_row, "| `method.name` | `'dreambooth'` | the personalization method; one of: "
                    + ", ".join(c.model_fields["name"].default for c in METHOD_SECTIONS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference_markdown())
