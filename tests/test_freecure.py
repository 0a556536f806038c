"""FreeCure: FASA processor, foundation pass and cache, masks (keyword table, cross-attention, face parsing), APG."""

import numpy as np
import pytest
import torch

from t2i_personal.errors import ConfigError
from t2i_personal.freecure import FreeCure, to_foundation_prompt
from t2i_personal.freecure.fasa import FasaState, FoundationAwareSelfAttention, default_layers, resolve_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a sks dog wearing a red hat"
STEPS = 3
SIZE = 32


def _lora_pipe(name: str):
    from peft import LoraConfig

    from t2i_personal.models.loading import load_components

    pipe = load_components(name).pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    return pipe


@pytest.fixture(scope="module", params=["builtin:tiny-sd", "builtin:tiny-sdxl"])
def pipe(request):
    return _lora_pipe(request.param)


def _plain(pipe, prompt=PROMPT, seed=0):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS, height=SIZE,
                width=SIZE, output_type="np").images[0]


def _run(cure, prompt=PROMPT, **kw):
    return cure(prompt, seed=0, num_inference_steps=STEPS, height=SIZE, width=SIZE, **kw)


def _array(image):
    return np.asarray(image, dtype=np.float64) / 255.0


def test_empty_mask_is_plain_attention_and_a_full_mask_changes_it(pipe):
    plain = _plain(pipe)
    nothing = _run(FreeCure(pipe, concepts=[("sks", "dog")], attributes=[]))
    assert nothing.attributes == [] and nothing.foundation_images == []  # nothing to repair: no foundation pass
    assert np.abs(_array(nothing.images[0]) - plain).max() <= 1.5 / 255  # PNG quantisation only
    # FASA with an all-empty mask is exactly plain attention
    cure = FreeCure(pipe, concepts=[("sks", "dog")])
    state = FasaState(omega=3.0, batch=1)
    processors = {f"{n}.processor": FoundationAwareSelfAttention(n, state) for n in cure.layers}
    state.start("record")
    with FreeCure._processors(pipe.unet, processors, state):
        _plain(pipe, "a dog wearing a red hat")
    state.masks = torch.zeros(1, 1, SIZE // pipe.vae_scale_factor, SIZE // pipe.vae_scale_factor)
    state.start("repair")
    with FreeCure._processors(pipe.unet, processors, state):
        repaired = _plain(pipe)
    assert np.abs(repaired - plain).max() < 1e-5
    full = _run(FreeCure(pipe, concepts=[("sks", "dog")], mask_source=np.ones((SIZE, SIZE)), omega=2.0))
    assert full.mask_sources == {"mask": "user"}
    assert np.abs(_array(full.images[0]) - plain).mean() > 0.01


def test_processors_installed_only_on_the_chosen_layers_and_restored(pipe):
    before = dict(pipe.unet.attn_processors)
    cure = FreeCure(pipe, concepts=[("sks", "dog")])
    seen = []

    def spy(_module, _args):
        seen.append(dict(pipe.unet.attn_processors))

    hook = pipe.unet.register_forward_pre_hook(spy)
    try:
        out = _run(cure)
    finally:
        hook.remove()
    assert out.attributes == ["hat"] and out.mask_sources == {"hat": "cross_attention"}
    repair = seen[-1]  # the personalized pass's last step
    chosen = {f"{n}.processor" for n in cure.layers}
    assert chosen and all(isinstance(repair[k], FoundationAwareSelfAttention) for k in chosen)
    assert all(repair[k] is before[k] for k in before if k not in chosen)
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_foundation_pass_is_plain_and_caches_the_plain_keys(pipe):
    cure = FreeCure(pipe, concepts=[("sks", "dog")])
    out = _run(cure)
    assert out.foundation_prompts == ["a dog wearing a red hat"]
    pipe.disable_lora()
    try:
        foundation = _plain(pipe, "a dog wearing a red hat")
        # the cache a recording run keeps equals the keys/values a plain foundation run computes
        name = cure.layers[-1]
        module = pipe.unet.get_submodule(name)
        keys = []
        hook = module.to_k.register_forward_hook(lambda _m, _i, o: keys.append(o[o.shape[0] // 2:].clone()))
        try:
            _plain(pipe, "a dog wearing a red hat")
        finally:
            hook.remove()
        state = FasaState(omega=1.0, batch=1)
        state.start("record")
        with FreeCure._processors(pipe.unet, {f"{name}.processor": FoundationAwareSelfAttention(name, state)}, state):
            recorded = _plain(pipe, "a dog wearing a red hat")
    finally:
        pipe.enable_lora()
    assert np.abs(_array(out.foundation_images[0]) - foundation).max() <= 1.5 / 255
    assert np.array_equal(recorded, foundation)
    assert len(keys) == STEPS and sorted(k[1] for k in state.cache) == list(range(STEPS))
    late = FasaState(omega=1.0, batch=1, first_step=STEPS - 1)  # fasa_start: nothing kept before its first step
    late.start("record")
    with FreeCure._processors(pipe.unet, {f"{name}.processor": FoundationAwareSelfAttention(name, late)}, late):
        _plain(pipe, "a dog wearing a red hat")
    assert sorted(late.cache) == [(name, STEPS - 1)]
    for step, k in enumerate(keys):
        cached = state.cache[(name, step)][0]  # [B, heads, N, d]
        torch.testing.assert_close(cached.transpose(1, 2).reshape(k.shape), k)


def test_two_calls_give_identical_results_and_lora_is_back_on(pipe):
    cure = FreeCure(pipe, concepts=[("sks", "dog")], omega=3.0)
    first, second = _run(cure), _run(cure)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert np.array_equal(np.asarray(first.mask[0]), np.asarray(second.mask[0]))
    with_lora = _plain(pipe)
    pipe.disable_lora()
    without = _plain(pipe)
    pipe.enable_lora()
    assert np.abs(with_lora - without).max() > 0  # the adapter is active again after FreeCure
    assert np.array_equal(_plain(pipe), with_lora)


def test_cross_attention_mask_is_binary_and_partial(pipe):
    out = _run(FreeCure(pipe, concepts=[("sks", "dog")], attributes=["hat"]))
    mask = np.asarray(out.masks[0]["hat"])
    assert set(np.unique(mask)) <= {0, 255}
    assert 0 < (mask > 0).mean() < 1


def test_default_layers_match_the_released_code():
    from diffusers import UNet2DConditionModel

    from t2i_personal.models.tiny import builtin_spec

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**{k: v for k, v in builtin_spec("sd15-arch")["unet"].items()
                                       if not k.startswith("_")})
        sdxl = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    # SD-1.x layer_idx 10-15 of 16: up_blocks.2 (32²) and up_blocks.3 (64²), three self-attentions each
    assert default_layers(sd15) == [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1"
                                    for b in (2, 3) for a in range(3)]
    # SDXL layer_idx 50-69 of 70, counted in call order (down, mid, up): the last 20 decoder transformer blocks
    names = [n for n, _ in sdxl.named_modules() if n.endswith(".attn1")]
    every = [n for part in ("down_blocks", "mid_block", "up_blocks") for n in names if n.startswith(part)]
    assert len(every) == 70
    assert default_layers(sdxl) == every[50:]
    assert default_layers(sdxl)[0] == "up_blocks.0.attentions.1.transformer_blocks.6.attn1"
    assert resolve_layers(sd15, ["up_blocks.3.*"]) == default_layers(sd15)[3:]
    with pytest.raises(ConfigError, match="matches no self-attention"):
        resolve_layers(sd15, ["up_blocks.9.*"])


def test_fasa_state_is_fresh_per_call_and_rejects_unknown_batching():
    state = FasaState(omega=1.0, batch=2)
    assert state.conditional_rows(4) == slice(2, 4) and state.conditional_rows(2) == slice(0, 2)
    with pytest.raises(RuntimeError, match="expected 2 or 4 rows"):
        state.conditional_rows(3)


def test_foundation_prompt_and_bad_options(pipe):
    assert to_foundation_prompt("a sks dog wearing a red hat", [("sks", "dog")]) == "a dog wearing a red hat"
    assert to_foundation_prompt("a photo of <new1> in the snow", [("<new1>", "cat")]) == "a photo of cat in the snow"
    with pytest.raises(ConfigError, match="mask_source"):
        FreeCure(pipe, mask_source="segment")
    with pytest.raises(ConfigError, match="apg_gamma"):
        FreeCure(pipe, apg_gamma=1.5)
    with pytest.raises(ConfigError, match=r"fasa_start must be in \[0, 1\)"):
        FreeCure(pipe, fasa_start=1.0)
    with pytest.raises(ConfigError, match="does not occur in the prompt"):
        _run(FreeCure(pipe, concepts=[("sks", "dog")], attributes=["scarf"]))
    with pytest.raises(ConfigError, match="empty"):
        _run(FreeCure(pipe, concepts=[("sks", "dog")], mask_source=np.zeros((SIZE, SIZE))))


def test_a_pipeline_without_adapters_or_record_needs_an_explicit_foundation():
    from t2i_personal.models.loading import load_components

    plain = load_components("builtin:tiny-sd").pipeline()
    with pytest.raises(ConfigError, match="foundation="):
        FreeCure(plain)
    other = load_components("builtin:tiny-sdxl").pipeline()
    with pytest.raises(ConfigError, match="different UNet architectures"):
        FreeCure(plain, foundation=other)
    assert FreeCure(plain, foundation="builtin:tiny-sd").foundation.pipe is not plain


def test_half_precision_paths_run_and_keep_the_empty_mask_identity():
    """The CUDA fp16/bf16 code paths (bias dtype, cache casts, recorder) on the CPU, in bfloat16."""
    pipe = _lora_pipe("builtin:tiny-sd").to(torch.bfloat16)
    cure = FreeCure(pipe, concepts=[("sks", "dog")])
    out = _run(cure)
    assert out.mask_sources == {"hat": "cross_attention"}
    assert np.isfinite(_array(out.images[0])).all() and _array(out.images[0]).std() > 0
    empty = _run(FreeCure(pipe, concepts=[("sks", "dog")], attributes=[]))
    assert np.abs(_array(empty.images[0]) - _plain(pipe)).max() <= 1.5 / 255


def test_several_images_per_prompt_and_no_guidance():
    """``num_images_per_prompt`` gives the same images as the pipeline's own, each with its own mask; a call without
    CFG (guidance 1: conditional rows only) works too."""
    pipe = _lora_pipe("builtin:tiny-sd")
    cure = FreeCure(pipe, concepts=[("sks", "dog")], attributes=[])
    out = _run(cure, num_images_per_prompt=2)
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, height=SIZE,
                 width=SIZE, num_images_per_prompt=2, output_type="np").images
    assert len(out.images) == 2 and len(out.mask) == 2
    for got, want in zip(out.images, plain):
        assert np.abs(_array(got) - want).max() <= 1.5 / 255
    hat = _run(FreeCure(pipe, concepts=[("sks", "dog")]), num_images_per_prompt=2, guidance_scale=1.0)
    assert len(hat.masks) == 2 and all("hat" in m for m in hat.masks)
    with pytest.raises(ConfigError, match="prompt_embeds"):
        cure(PROMPT, prompt_embeds=torch.zeros(1, 77, 32))


def test_batched_prompts_repair_only_what_each_prompt_names(pipe):
    prompts = ["a sks dog wearing a red hat", "a sks dog on the beach"]
    out = _run(FreeCure(pipe, concepts=[("sks", "dog")], omega=4.0), prompts)
    plain = pipe(prompts, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, height=SIZE,
                 width=SIZE, output_type="np").images
    assert out.mask_sources == {"hat": "cross_attention"}
    assert np.asarray(out.mask[0]).any() and not np.asarray(out.mask[1]).any()
    assert np.abs(_array(out.images[1]) - plain[1]).max() <= 1.5 / 255  # empty mask row: plain attention
    assert np.abs(_array(out.images[0]) - plain[0]).mean() > 1e-3


def test_non_square_latents(pipe):
    out = FreeCure(pipe, concepts=[("sks", "dog")])(PROMPT, seed=0, num_inference_steps=2, height=48, width=32)
    assert out.images[0].size == (32, 48) and out.mask[0].size == (32, 48)


def test_layer_grid_follows_the_unets_rounding():
    from t2i_personal.freecure.fasa import layer_grid

    assert layer_grid(81, (65, 65)) == (9, 9)  # 65 -> 33 -> 17 -> 9, not round(65 / 7)
    assert layer_grid(12, (8, 6)) == (4, 3) and layer_grid(6 * 4, (6, 4)) == (6, 4)
    with pytest.raises(RuntimeError, match="no UNet level"):
        layer_grid(10, (8, 8))
