"""Joint-attention FASA (FLUX.1 double/single-stream, SD3 joint blocks) on tiny seeded transformers."""

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

from t2i_personal.freecure.joint_fasa import (DEFAULT_JOINT_OMEGA, JointAttentionMaps, JointFasaState,
                                              default_joint_layers, default_map_layers, installed,
                                              joint_attention_names, joint_fasa_processors, mask_to_tokens,
                                              text_token_positions, token_grid, token_patch)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LATENT = 8  # latent side: FLUX packs it into a 4×4 token grid, SD3 (patch 1) keeps 8×8
TEXT = 6


def flux(seed: int) -> FluxTransformer2DModel:
    # in_channels=16: FLUX's transformer sees 2×2-packed latents, so 4 latent channels arrive as 16
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True).eval()


def sd3(seed: int) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                 pooled_projection_dim=64, out_channels=4).eval()


def flux_inputs(batch: int, seed: int = 0, timestep: float = 0.7) -> dict:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    return dict(hidden_states=FluxPipeline._pack_latents(latents, batch, 4, LATENT, LATENT),
                encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g),
                timestep=torch.full((batch,), timestep), guidance=torch.full((batch,), 3.5),
                img_ids=FluxPipeline._prepare_latent_image_ids(batch, LATENT // 2, LATENT // 2, "cpu", torch.float32),
                txt_ids=torch.zeros(TEXT, 3), return_dict=False)


def sd3_inputs(batch: int, seed: int = 0, timestep: float = 700.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, LATENT, LATENT, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g),
                timestep=torch.full((batch,), timestep), return_dict=False)


def cfg(inputs: dict, batch: int) -> dict:
    """An SD3-style CFG call: every tensor input stacked [uncond; cond], the unconditional rows from another seed."""
    other = sd3_inputs(batch, seed=99)
    return {k: torch.cat([other[k], v]) if k in ("encoder_hidden_states", "pooled_projections") else
            torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in inputs.items()}


@torch.no_grad()
def run(model, inputs, state=None, processors=None, steps: int = 1) -> list[torch.Tensor]:
    """``steps`` calls (timesteps falling), the outputs of each; with ``processors`` installed when given."""
    def call(i):
        step = dict(inputs, timestep=inputs["timestep"] * (1 - 0.1 * i))
        return model(**step)[0]
    if processors is None:
        return [call(i) for i in range(steps)]
    with installed(model, processors, state):
        return [call(i) for i in range(steps)]


def everywhere(model, state, **kwargs):
    return joint_fasa_processors(model, state, layers=joint_attention_names(model), **kwargs)


# -------------------------------------------------------------------------------------------------- layers


def test_default_layers_and_token_geometry():
    f, s = flux(0), sd3(0)
    assert default_joint_layers(f) == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert default_map_layers(f) == ["transformer_blocks.0.attn"]
    assert default_joint_layers(s) == ["transformer_blocks.1.attn"]
    assert default_map_layers(s) == ["transformer_blocks.0.attn"]
    assert "transformer_blocks.0.attn" in joint_attention_names(f) and len(joint_attention_names(f)) == 3
    assert token_patch(f) == 2 and token_patch(s) == 1
    assert token_grid(f, 1024, 768) == (64, 48) and token_grid(s, 1024, 768) == (128, 96)
    assert DEFAULT_JOINT_OMEGA == 1.0


def test_mask_to_tokens_follows_flux_packing_order():
    mask = torch.zeros(2, 1, LATENT, LATENT)
    mask[0, :, :4, :2] = 1  # top-left: rows 0-3, columns 0-1
    mask[1, :, 5:, 3:7] = 1
    tokens = mask_to_tokens(mask, (LATENT // 2, LATENT // 2)).flatten(1)
    packed = FluxPipeline._pack_latents(mask, 2, 1, LATENT, LATENT)  # [2, 16, 4]: the 4 cells of each token
    assert torch.equal(tokens, (packed.mean(-1) >= 0.5).float())
    assert tokens[0].sum() == 2 and tokens[0, 0] == 1 and tokens[0, 4] == 1  # token (row, col) = (0,0), (1,0)


# --------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("make, inputs", [(flux, flux_inputs), (sd3, sd3_inputs)])
def test_record_is_plain_and_keeps_post_norm_image_keys(make, inputs):
    model, x = make(0), inputs(2)
    stock = run(model, x, steps=2)
    state = JointFasaState.for_transformer(model, batch=2)
    state.start("record")
    maps = JointAttentionMaps()
    recorded = run(model, x, state, everywhere(model, state, maps=maps, map_layers=joint_attention_names(model)), 2)
    assert all(torch.equal(a, b) for a, b in zip(stock, recorded))
    names = joint_attention_names(model)
    assert sorted(state.cache) == sorted((n, s) for n in names for s in (0, 1))
    heads = model.config.num_attention_heads
    for key, value in state.cache.values():
        assert key.shape == value.shape == (2, heads, 16 if make is flux else 64, model.config.attention_head_dim)
        assert key._base is None  # a copy, not a view holding the whole batch's keys


def test_cached_flux_keys_are_what_attention_uses():
    """The single-stream block's cached keys = its own projection of the image tokens after norm_k and RoPE."""
    model, x = flux(0), flux_inputs(1)
    attn = model.get_submodule("single_transformer_blocks.1.attn")
    seen = {}
    attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    state = JointFasaState.for_transformer(model, batch=1)
    state.start("record")
    run(model, x, state, joint_fasa_processors(model, state))
    hidden, rope = seen["hidden_states"], seen["image_rotary_emb"]
    key = attn.norm_k(attn.to_k(hidden).unflatten(-1, (attn.heads, -1)))
    key = apply_rotary_emb(key, rope, sequence_dim=1)[:, TEXT:].transpose(1, 2)
    cached, _ = state.cache[("single_transformer_blocks.1.attn", 0)]
    assert torch.allclose(cached, key, atol=1e-6)


@pytest.mark.parametrize("make, inputs", [(flux, flux_inputs), (sd3, sd3_inputs)])
def test_empty_mask_is_exactly_plain(make, inputs):
    model, foundation, x = make(0), make(1), inputs(2)
    stock = run(model, x)[0]
    state = JointFasaState.for_transformer(model, batch=2, omega=5.0)
    state.start("record")
    run(foundation, x, state, everywhere(foundation, state))
    for masks in (None, torch.zeros(2, 1, LATENT, LATENT)):
        state.masks = masks
        state.start("repair")
        assert torch.equal(run(model, x, state, everywhere(model, state))[0], stock)


# ----------------------------------------------------------------------------------------------- repair


def lora_tuned(make, seed: int = 0, rank: int = 2) -> torch.nn.Module:
    """A "personalized" model: ``make(seed)`` plus a random rank-2 delta on every attention's q/k/v projections, the
    shape of a LoRA fine-tune. (FASA brings the foundation's values into the personalized network, so the two must
    share a value space: against an unrelated second random network the output does not move, ratio ≈ 1.00.)"""
    model, g = make(seed), torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
                w = module.weight
                w += w.std() * torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
    return model


@pytest.mark.parametrize("make, inputs", [(flux, flux_inputs), (sd3, sd3_inputs)])
def test_whole_mask_moves_toward_the_foundation(make, inputs):
    foundation, model, x = make(0), lora_tuned(make), inputs(1)
    target = run(foundation, x, steps=2)
    plain = run(model, x, steps=2)
    state = JointFasaState.for_transformer(model, batch=1, omega=8.0)
    state.start("record")
    run(foundation, x, state, everywhere(foundation, state), steps=2)
    state.masks = torch.ones(1, 1, LATENT, LATENT)
    state.start("repair")
    repaired = run(model, x, state, everywhere(model, state), steps=2)
    for t, p, r in zip(target, plain, repaired):
        assert (r - t).norm() < 0.7 * (p - t).norm()


def test_sd3_repaired_layer_is_the_fasa_equation():
    """One layer, a partial mask: image queries read [own image; own text; foundation image + B], B = ω inside the
    mask and −∞ outside; text queries read their own keys only."""
    name, omega = "transformer_blocks.1.attn", 1.5
    foundation, model, x = sd3(0), lora_tuned(sd3), sd3_inputs(1)
    state = JointFasaState.for_transformer(model, batch=1, omega=omega)
    state.start("record")
    run(foundation, x, state, joint_fasa_processors(foundation, state, layers=[name]))
    found_key, found_value = state.cache[(name, 0)]
    state.masks = torch.zeros(1, 1, LATENT, LATENT)
    state.masks[..., 2:6, 1:5] = 1
    attn, seen = model.get_submodule(name), {}
    attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs, out=out), with_kwargs=True)
    state.start("repair")
    run(model, x, state, joint_fasa_processors(model, state, layers=[name]))

    def heads(t):
        return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    image, text = seen["hidden_states"], seen["encoder_hidden_states"]
    q = torch.cat([heads(attn.to_q(image)), heads(attn.add_q_proj(text))], dim=2)
    k = torch.cat([heads(attn.to_k(image)), heads(attn.add_k_proj(text))], dim=2)
    v = torch.cat([heads(attn.to_v(image)), heads(attn.add_v_proj(text))], dim=2)
    inside = state.masks.flatten() > 0
    bias = torch.cat([torch.zeros(k.shape[2]), torch.where(inside, omega, -torch.inf)])
    n = image.shape[1]
    logits = q[:, :, :n] @ torch.cat([k, found_key], 2).transpose(-1, -2) / q.shape[-1] ** 0.5 + bias
    image_out = logits.softmax(-1) @ torch.cat([v, found_value], 2)
    text_out = (q[:, :, n:] @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1) @ v
    out = torch.cat([image_out, text_out], 2).transpose(1, 2).flatten(2)
    assert torch.allclose(seen["out"][0], attn.to_out[0](out[:, :n]), atol=1e-5)
    text_expected = out[:, n:] if attn.context_pre_only else attn.to_add_out(out[:, n:])  # the last block: raw
    assert torch.allclose(seen["out"][1], text_expected, atol=1e-5)


def test_flux_every_row_is_conditional_and_masks_are_per_sample():
    """FLUX-dev: no CFG batch, every row is an image of its own; sample 0's empty mask leaves it exactly plain."""
    model, foundation, x = flux(0), flux(1), flux_inputs(2)
    stock = run(model, x)[0]
    state = JointFasaState.for_transformer(model, batch=2, omega=4.0)
    state.start("record")
    run(foundation, x, state, joint_fasa_processors(foundation, state))
    assert state.cache[("single_transformer_blocks.1.attn", 0)][0].shape[0] == 2
    state.masks = torch.zeros(2, 1, LATENT, LATENT)
    state.masks[1, :, :4] = 1  # top half of image 1
    state.start("repair")
    repaired = run(model, x, state, joint_fasa_processors(model, state))[0]
    assert torch.equal(repaired[0], stock[0])
    assert not torch.allclose(repaired[1], stock[1], atol=1e-4)


def test_sd3_cfg_batch_leaves_the_unconditional_rows():
    model, foundation, x = sd3(0), sd3(1), cfg(sd3_inputs(2), 2)
    stock = run(model, x)[0]
    state = JointFasaState.for_transformer(model, batch=2, omega=4.0)
    state.start("record")
    run(foundation, x, state, everywhere(foundation, state))
    assert all(k.shape[0] == 2 for k, _ in state.cache.values())  # only the conditional half is kept
    state.masks = torch.ones(2, 1, LATENT, LATENT)
    state.start("repair")
    repaired = run(model, x, state, everywhere(model, state))[0]
    assert torch.equal(repaired[:2], stock[:2])
    assert not torch.allclose(repaired[2:], stock[2:], atol=1e-4)


@pytest.mark.parametrize("make, inputs", [(flux, flux_inputs), (sd3, sd3_inputs)])
def test_fasa_starts_at_first_step(make, inputs):
    """Before ``first_step`` (fasa_start · steps) the foundation pass keeps nothing and the repair pass is the stock
    model; from it on FASA acts as without a start."""
    foundation, model, x = make(0), lora_tuned(make), inputs(1)
    stock = run(model, x, steps=3)
    state = JointFasaState.for_transformer(model, batch=1, omega=8.0, first_step=2)
    state.start("record")
    run(foundation, x, state, everywhere(foundation, state), steps=3)
    assert {step for _, step in state.cache} == {2}
    state.masks = torch.ones(1, 1, LATENT, LATENT)
    state.start("repair")
    late = run(model, x, state, everywhere(model, state), steps=3)
    assert torch.equal(late[0], stock[0]) and torch.equal(late[1], stock[1])
    from_start = JointFasaState.for_transformer(model, batch=1, omega=8.0)
    from_start.start("record")
    run(foundation, x, from_start, everywhere(foundation, from_start), steps=3)
    from_start.masks = state.masks
    from_start.start("repair")
    assert torch.equal(run(model, x, from_start, everywhere(model, from_start), steps=3)[2], late[2])
    assert not torch.allclose(late[2], stock[2], atol=1e-4)


def test_repeated_timestep_is_an_extra_plain_call():
    """FLUX true CFG calls the transformer twice per step (the negative prompt second, same timestep): the second
    call neither advances the step nor is repaired."""
    model, foundation, x = flux(0), flux(1), flux_inputs(1)
    negative = flux_inputs(1, seed=5)
    state = JointFasaState.for_transformer(model, batch=1, omega=4.0)
    state.start("record")
    with torch.no_grad(), installed(foundation, joint_fasa_processors(foundation, state), state):
        foundation(**x)
        foundation(**negative)
    assert state.step == 0 and sorted(state.cache) == [(n, 0) for n in default_joint_layers(foundation)]
    state.masks = torch.ones(1, 1, LATENT, LATENT)
    state.start("repair")
    with torch.no_grad(), installed(model, joint_fasa_processors(model, state), state):
        first = model(**x)[0]
        second = model(**negative)[0]
    assert not torch.equal(first, run(model, x)[0])
    assert torch.equal(second, run(model, negative)[0])


def test_wrong_mask_size_and_missing_foundation_are_refused():
    model, x = sd3(0), sd3_inputs(1)
    state = JointFasaState.for_transformer(model, batch=1)
    state.masks = torch.ones(1, 1, LATENT, LATENT)
    state.start("repair")
    with pytest.raises(RuntimeError, match="foundation pass must run first"):
        run(model, x, state, joint_fasa_processors(model, state))
    state.masks = torch.ones(1, 1, 4, 4)
    state.start("repair")
    with pytest.raises(RuntimeError, match="image tokens"):
        run(model, x, state, joint_fasa_processors(model, state))


# ------------------------------------------------------------------------------------------------- maps


def test_sd3_attention_map_matches_an_explicit_softmax():
    model, x = sd3(0), cfg(sd3_inputs(2), 2)
    attn = model.get_submodule("transformer_blocks.0.attn")
    seen = {}
    attn.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    state = JointFasaState.for_transformer(model, batch=2)
    maps = JointAttentionMaps()
    stock = run(model, x)[0]
    out = run(model, x, state, joint_fasa_processors(model, state, layers=[], maps=maps))[0]
    assert torch.equal(out, stock)  # recording maps changes nothing

    hidden, text = seen["hidden_states"][2:], seen["encoder_hidden_states"][2:]  # the conditional rows
    def heads(t):
        return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    query = heads(attn.to_q(hidden))
    key = torch.cat([heads(attn.to_k(hidden)), heads(attn.add_k_proj(text))], dim=2)
    probs = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(-1).mean(1)  # [2, 64, 64 + TEXT]
    positions = [[1, 2], [4]]
    heat = maps.heatmap(positions, (LATENT, LATENT))
    assert heat.shape == (2, LATENT, LATENT)
    expected = torch.stack([probs[i, :, 64:][:, positions[i]].sum(-1) for i in range(2)]).view(2, LATENT, LATENT)
    assert torch.allclose(heat, expected, atol=1e-5)


def test_flux_maps_sum_sensibly_and_threshold_into_masks():
    model, x = flux(0), flux_inputs(2)
    state = JointFasaState.for_transformer(model, batch=2)
    maps = JointAttentionMaps()
    state.start("record")
    run(model, x, state, joint_fasa_processors(model, state, maps=maps), steps=3)
    assert maps.calls == {"transformer_blocks.0.attn": 3}
    grid = (LATENT // 2, LATENT // 2)
    every = maps.heatmap(list(range(TEXT)), grid)  # all text keys: each image query's text share, in (0, 1)
    assert every.shape == (2, *grid) and (every > 0).all() and (every < 1).all()
    parts = maps.heatmap([0, 1], grid) + maps.heatmap([2, 3, 4, 5], grid)
    assert torch.allclose(parts, every, atol=1e-6)
    mask = maps.mask([[2], []], grid)
    assert mask.shape == (2, 1, *grid) and 0 < mask[0].sum() < 16 and mask[1].sum() == 0


def test_text_token_positions_with_offset():
    from t2i_personal.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    ids = tok("a dog wearing a red hat").input_ids
    positions = text_token_positions(tok, "a dog wearing a red hat", "red hat")
    assert [ids[i] for i in positions] == tok("red hat", add_special_tokens=False).input_ids
    assert text_token_positions(tok, "a dog wearing a red hat", "red hat", offset=77) == [p + 77 for p in positions]
    assert text_token_positions(tok, "a dog", "scarf") == []
