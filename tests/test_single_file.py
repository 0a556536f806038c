"""Round trips: diffusers components -> original-layout .safetensors -> diffusers' from_single_file.

Offline and CPU only: tiny models built from configs, a CLIP tokenizer built from open_clip's BPE file.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from t2i_personal.models.single_file import (
    diffusers_to_original_sd,
    diffusers_to_original_sdxl,
    save_original_sd_checkpoint,
    save_original_sdxl_checkpoint,
)

VOCAB = 49408
BOS, EOS = VOCAB - 2, VOCAB - 1


# ------------------------------------------------------------------------------------------- fixtures


def _bytes_to_unicode() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + n)
            n += 1
    return [chr(c) for c in chars]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> tuple[str, str]:
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def _tokenizer(files: tuple[str, str], pad: str = "<|endoftext|>") -> CLIPTokenizer:
    return CLIPTokenizer(files[0], files[1], model_max_length=77, pad_token=pad)


def _text_config(**overrides) -> CLIPTextConfig:
    kwargs = dict(
        bos_token_id=BOS,
        eos_token_id=EOS,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=VOCAB,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


SD1_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
)
SD1_VAE = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
)
# Second shape: one resnet per block, three blocks, attention first and last (upsampler both after a
# resnet and after an attention), GroupNorm of 16, and a three-level VAE.
THREE_BLOCK_UNET = dict(
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
)
THREE_BLOCK_VAE = dict(
    block_out_channels=[16, 32, 32],
    norm_num_groups=16,
    layers_per_block=1,
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    latent_channels=4,
)


def _sd_pipeline(tokenizer_files, unet_kw, vae_kw, text_kw=None) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_kw)
    torch.manual_seed(1)
    vae = AutoencoderKL(**vae_kw)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config(**(text_kw or {})))
    scheduler = PNDMScheduler(skip_prk_steps=True)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(tokenizer_files),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module, name: str, dtype=None) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert set(want) == set(got), f"{name}: keys differ"
    for key, tensor in want.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        assert got[key].device.type == "cpu", f"{name}.{key} was not loaded ({got[key].device})"
        assert got[key].dtype == tensor.dtype, f"{name}.{key}: {got[key].dtype} != {tensor.dtype}"
        assert torch.equal(got[key], tensor), f"{name}.{key} differs after the round trip"


def _image(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        guidance_scale=6.0,
        height=64,
        width=64,
        generator=generator,
        output_type="np",
        **kwargs,
    ).images


# ------------------------------------------------------------------------------------------------ SD 1


@pytest.mark.parametrize(
    "unet_kw, vae_kw",
    [(SD1_UNET, SD1_VAE), (THREE_BLOCK_UNET, THREE_BLOCK_VAE)],
    ids=["sd1-tiny", "three-blocks"],
)
def test_sd1_round_trip_through_from_single_file(tmp_path, tokenizer_files, unet_kw, vae_kw):
    pipe = _sd_pipeline(tokenizer_files, unet_kw, vae_kw)
    folder = tmp_path / "folder"
    pipe.save_pretrained(folder)
    file = save_original_sd_checkpoint(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "model.safetensors")
    assert file == tmp_path / "model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "model.safetensors"]  # no temp file left

    state = load_file(str(file))
    assert infer_diffusers_model_type(state) == "v1"
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")) for k in state)
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in state
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in state
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert state["first_stage_model.decoder.mid.attn_1.proj_out.weight"].ndim == 4
    n_params = sum(len(m.state_dict()) for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    assert len(state) == n_params

    loaded = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name), name)
    np.testing.assert_array_equal(_image(pipe), _image(loaded))


def test_original_key_names_for_attention_first_unet(tokenizer_files):
    pipe = _sd_pipeline(tokenizer_files, THREE_BLOCK_UNET, THREE_BLOCK_VAE)
    state = diffusers_to_original_sd(pipe.unet, pipe.vae, pipe.text_encoder)
    unet = {k.removeprefix("model.diffusion_model.") for k in state if k.startswith("model.diffusion_model.")}
    # layers_per_block=1, 3 blocks: input_blocks 1 (res+attn), 2 (down), 3 (res), 4 (down), 5 (res+attn)
    assert {"input_blocks.1.1.proj_in.weight", "input_blocks.2.0.op.weight", "input_blocks.5.1.norm.weight"} <= unet
    assert "input_blocks.6.0.op.weight" not in unet
    # output_blocks: 2 per up block; upsampler after the attention (slot 2) in block 0, after the resnet in block 1
    assert {"output_blocks.1.2.conv.weight", "output_blocks.3.1.conv.weight", "output_blocks.5.1.proj_out.bias"} <= unet
    assert {"middle_block.0.in_layers.0.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight"} <= unet
    assert {"middle_block.2.out_layers.3.weight", "time_embed.2.bias", "out.2.weight"} <= unet
    # decoder levels are numbered from the highest resolution: diffusers up_blocks.0 is up.2
    assert state["first_stage_model.decoder.up.2.block.0.conv1.weight"].shape[0] == 32
    assert state["first_stage_model.decoder.up.0.block.0.conv1.weight"].shape[0] == 16
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in state
    assert "first_stage_model.encoder.down.2.downsample.conv.weight" not in state


@pytest.mark.parametrize("n_blocks", [2, 3, 4])
def test_vae_round_trip_any_depth(tmp_path, n_blocks):
    channels = [16, 32, 32, 64][:n_blocks]
    kw = dict(
        block_out_channels=channels,
        norm_num_groups=8,
        layers_per_block=2,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n_blocks,
        up_block_types=["UpDecoderBlock2D"] * n_blocks,
        latent_channels=4,
    )
    torch.manual_seed(n_blocks)
    vae = AutoencoderKL(**kw)
    vae.save_config(tmp_path / "vae")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD1_UNET)
    text_encoder = CLIPTextModel(_text_config(vocab_size=1000, bos_token_id=0, eos_token_id=2))
    state = diffusers_to_original_sd(unet, vae, text_encoder)
    loaded = AutoencoderKL.from_single_file(state, config=str(tmp_path), subfolder="vae", local_files_only=True)
    _assert_same_weights(vae, loaded, "vae")
    unet.save_config(tmp_path / "unet")
    loaded_unet = UNet2DConditionModel.from_single_file(state, config=str(tmp_path), subfolder="unet", local_files_only=True)
    _assert_same_weights(unet, loaded_unet, "unet")


def test_fp16_export_and_metadata(tmp_path, tokenizer_files):
    pipe = _sd_pipeline(tokenizer_files, SD1_UNET, SD1_VAE)
    pipe.save_pretrained(tmp_path / "folder")
    path = tmp_path / "sub" / "half.safetensors"
    save_original_sd_checkpoint(
        pipe.unet, pipe.vae, pipe.text_encoder, path, dtype=torch.float16, metadata={"steps": 1200, "method": "dreambooth"}
    )
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "steps": "1200", "method": "dreambooth"}
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(tmp_path / "folder"), local_files_only=True, torch_dtype=torch.float16
    )
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name), name, dtype=torch.float16)


def test_overwrite_is_atomic_and_keeps_old_file_on_failure(tmp_path, tokenizer_files, monkeypatch):
    pipe = _sd_pipeline(tokenizer_files, SD1_UNET, SD1_VAE)
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")

    import t2i_personal.models.single_file as single_file

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(single_file, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_original_sd_checkpoint(pipe.unet, pipe.vae, pipe.text_encoder, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    monkeypatch.undo()
    save_original_sd_checkpoint(pipe.unet, pipe.vae, pipe.text_encoder, path)
    assert len(load_file(str(path))) > 100


def test_unsupported_structures_raise():
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(vocab_size=1000, bos_token_id=0, eos_token_id=2))
    vae = AutoencoderKL(**SD1_VAE)
    per_block = UNet2DConditionModel(**{**SD1_UNET, "layers_per_block": (1, 2)})
    with pytest.raises(NotImplementedError, match="layers_per_block"):
        diffusers_to_original_sd(per_block, vae, text_encoder)
    no_mid_attention = UNet2DConditionModel(**{**SD1_UNET, "mid_block_type": "UNetMidBlock2D"})
    with pytest.raises(NotImplementedError, match="mid block"):
        diffusers_to_original_sd(no_mid_attention, vae, text_encoder)
    hid_proj = UNet2DConditionModel(**{**SD1_UNET, "encoder_hid_dim": 16})
    with pytest.raises(NotImplementedError, match="encoder_hid_proj"):
        diffusers_to_original_sd(hid_proj, vae, text_encoder)


def test_full_size_configs_give_the_official_key_sets():
    # Meta-device models (no memory): SD 1.5 / 2.1 / SDXL base architectures. The official files have 1131 /
    # 2515 keys; they also carry position_ids (and logit_scale for SDXL), which are not learned parameters.
    from accelerate import init_empty_weights

    with init_empty_weights():
        vae = AutoencoderKL(
            block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            layers_per_block=2,
            latent_channels=4,
        )
        clip_l = CLIPTextModel(CLIPTextConfig())
        sd15 = diffusers_to_original_sd(UNet2DConditionModel(cross_attention_dim=768), vae, clip_l)
        sd21 = diffusers_to_original_sd(
            UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
            vae,
            CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu"
                )
            ),
        )
        xl_unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=[1, 2, 10],
            attention_head_dim=[5, 10, 20],
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        big_g = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_attention_heads=20,
                num_hidden_layers=32,
                hidden_act="gelu",
                projection_dim=1280,
            )
        )
        xl = diffusers_to_original_sdxl(xl_unet, vae, clip_l, big_g)

    def count(state, prefix):
        return sum(k.startswith(prefix) for k in state)

    assert (len(sd15), infer_diffusers_model_type(sd15)) == (1130, "v1")
    assert (count(sd15, "model.diffusion_model."), count(sd15, "first_stage_model.")) == (686, 248)
    for key in (
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
    ):
        assert key in sd15, key
    assert tuple(sd15["first_stage_model.decoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    assert (len(sd21), infer_diffusers_model_type(sd21)) == (1214, "v2")
    assert (len(xl), infer_diffusers_model_type(xl)) == (2513, "xl_base")
    assert (count(xl, "model.diffusion_model."), count(xl, "conditioner.embedders.1.model.")) == (1680, 389)


# ------------------------------------------------------------------------------------------------ SD 2


def test_sd2_open_clip_text_encoder_round_trip(tmp_path, tokenizer_files):
    unet_kw = {**SD1_UNET, "attention_head_dim": (2, 4), "use_linear_projection": True, "cross_attention_dim": 64}
    pipe = _sd_pipeline(
        tokenizer_files, unet_kw, SD1_VAE, text_kw={"hidden_act": "gelu", "hidden_size": 64, "intermediate_size": 48}
    )
    pipe.save_pretrained(tmp_path / "folder")
    file = save_original_sd_checkpoint(pipe.unet, pipe.vae, pipe.text_encoder, tmp_path / "sd2.safetensors")
    state = load_file(str(file))
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert state["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)

    loaded = StableDiffusionPipeline.from_single_file(str(file), config=str(tmp_path / "folder"), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name), name)
    np.testing.assert_array_equal(_image(pipe), _image(loaded))


# ------------------------------------------------------------------------------------------------ SDXL


def _sdxl_pipeline(tokenizer_files) -> StableDiffusionXLPipeline:
    # Two encoders of different widths (32 and 48), as CLIP-L/bigG are; 10 layers in the second so the file
    # carries the `resblocks.9` key diffusers uses to recognise an SDXL base checkpoint.
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **{**SD1_UNET, "cross_attention_dim": 32 + 48},
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=1,
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(**SD1_VAE)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(hidden_size=48, intermediate_size=64, num_hidden_layers=10, hidden_act="gelu", projection_dim=32)
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer(tokenizer_files),
        tokenizer_2=_tokenizer(tokenizer_files, pad="!"),
        unet=unet,
        scheduler=scheduler,
    )


def test_sdxl_round_trip_through_from_single_file(tmp_path, tokenizer_files):
    pipe = _sdxl_pipeline(tokenizer_files)
    folder = tmp_path / "folder"
    pipe.save_pretrained(folder)
    file = save_original_sdxl_checkpoint(
        pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, tmp_path / "xl.safetensors"
    )
    state = load_file(str(file))
    assert infer_diffusers_model_type(state) == "xl_base"
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in state
    proj = state["conditioner.embedders.1.model.text_projection"]
    assert proj.shape == (48, 32)  # [hidden, projection_dim], transposed from the Linear weight
    assert torch.equal(proj, pipe.text_encoder_2.text_projection.weight.T)
    fused = state["conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_bias"]
    layer = pipe.text_encoder_2.text_model.encoder.layers[3].self_attn
    assert torch.equal(fused, torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias]))

    loaded = StableDiffusionXLPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name), name)
    np.testing.assert_array_equal(_image(pipe), _image(loaded))


def test_sdxl_same_width_encoders_are_refused(tokenizer_files):
    pipe = _sdxl_pipeline(tokenizer_files)
    same = CLIPTextModelWithProjection(_text_config(hidden_act="gelu", projection_dim=32))
    with pytest.raises(ValueError, match="wide"):
        diffusers_to_original_sdxl(pipe.unet, pipe.vae, pipe.text_encoder, same)
