"""Flamingo's building blocks (models/flamingo.py, `open_flamingo_to_ours` in models/convert.py): the resampler
and the gated cross-attention block equal OpenFlamingo's modules on random weights, the media mask (immediate
and all previous images, cached media) against an independent count, text before the first image sees nothing,
closed gates leave the text unchanged, and the names of a whole OpenFlamingo checkpoint."""
import pytest
import torch
from torch import nn

from crossmodal.models.convert import open_flamingo_to_ours
from crossmodal.models.flamingo import GatedCrossAttentionBlock, PerceiverResampler, media_attention_mask

DIM, DIM_VISUAL = 24, 16
BLOCK_KWARGS = dict(dim=DIM, dim_visual=DIM_VISUAL, dim_head=8, heads=3, ff_mult=2)
RESAMPLER_KWARGS = dict(dim=DIM_VISUAL, depth=2, dim_head=8, heads=3, num_latents=5, ff_mult=2)

# (B, T) `<image>` positions: the first row has text before its first image, the second starts with one, the
# third has none.
MEDIA_LOCATIONS = torch.tensor(
    [
        [0, 0, 1, 0, 0, 1, 0, 0, 0, 1],
        [1, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.bool,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def open_flamingo_helpers():
    reason = "OpenFlamingo is the test-only reference: pip install --no-deps open-flamingo==2.0.1 einops-exts"
    return pytest.importorskip("open_flamingo.src.helpers", reason=reason, exc_type=ImportError)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Norms around identity, gates open (tanh ~ +-0.5), other tensors random; every key then matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name:
                tensor.copy_((1 if name.endswith("weight") else 0) + 0.1 * noise)
            elif name.endswith("gate"):
                tensor.copy_(0.5 * noise.sign() + 0.1 * noise)
            else:
                tensor.copy_(0.3 * noise)
    return module.eval()


def converted(reference: nn.Module, ours: nn.Module) -> nn.Module:
    ours.load_state_dict(open_flamingo_to_ours(reference.state_dict()))  # strict: every key maps
    return ours.eval()


def assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    difference = (got - expected).abs().max().item()
    relative = difference / expected.abs().max().item()
    assert relative < rtol, f"max abs diff {difference:.3g}, relative to the largest value {relative:.3g}"


def inputs(seed: int, num_media: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(3, MEDIA_LOCATIONS.shape[1], DIM, generator=generator)
    media = torch.randn(3, num_media, 5, DIM_VISUAL, generator=generator)  # (B, T_media, latents, dim_visual)
    return text, media


@pytest.mark.parametrize("time_embeddings", [False, True], ids=["released", "time_embeddings"])
@torch.no_grad()
def test_resampler_equals_open_flamingo(time_embeddings):
    helpers = open_flamingo_helpers()
    kwargs = dict(RESAMPLER_KWARGS, max_num_media=4, max_num_frames=3) if time_embeddings else RESAMPLER_KWARGS
    torch.manual_seed(0)
    reference = randomize_(helpers.PerceiverResampler(**kwargs), seed=1)
    ours = converted(reference, PerceiverResampler(**kwargs))
    x = torch.randn(2, 3, 2, 7, DIM_VISUAL, generator=torch.Generator().manual_seed(2))  # (B, T_media, F, v, D)
    got = ours(x)
    assert got.shape == (2, 3, 5, DIM_VISUAL)
    assert_close(got, reference(x))


@pytest.mark.parametrize("only_attend_immediate_media", [True, False], ids=["immediate", "all_previous"])
@torch.no_grad()
def test_gated_block_equals_open_flamingo(only_attend_immediate_media):
    helpers = open_flamingo_helpers()
    kwargs = dict(BLOCK_KWARGS, only_attend_immediate_media=only_attend_immediate_media)
    torch.manual_seed(0)
    reference = randomize_(helpers.GatedCrossAttentionBlock(**kwargs), seed=3)
    ours = converted(reference, GatedCrossAttentionBlock(**kwargs))
    text, media = inputs(seed=4)
    got = ours(text, media, media_locations=MEDIA_LOCATIONS)
    expected = reference(text, media, media_locations=MEDIA_LOCATIONS)
    # OpenFlamingo zeroes the cross-attention of text before any image only in the immediate mode; in the other it
    # attends uniformly to every image (a documented difference), so compare there only after the first image.
    after_first_image = MEDIA_LOCATIONS.cumsum(1) > 0
    compared = torch.ones_like(after_first_image) if only_attend_immediate_media else after_first_image
    assert_close(got[compared], expected[compared])
    # Cached media (incremental decoding): new tokens come after every image of the prompt.
    new_text = text[:, :2]
    got = ours(new_text, media, media_locations=MEDIA_LOCATIONS, use_cached_media=True)
    expected = reference(new_text, media, media_locations=MEDIA_LOCATIONS, use_cached_media=True)
    has_image = MEDIA_LOCATIONS.any(1)
    compared = torch.ones_like(has_image) if only_attend_immediate_media else has_image
    assert_close(got[compared], expected[compared])
    # Without locations every token sees every image (OpenFlamingo accepts that only with cached media).
    assert_close(ours(text, media), reference(text, media, use_cached_media=True))


def test_media_mask_against_a_count():
    """Each token's mask from counting the images at or before it, written as plain loops."""
    generator = torch.Generator().manual_seed(5)
    locations = torch.rand(4, 16, generator=generator) < 0.25
    num_media = int(locations.sum(1).max())
    for immediate in (True, False):
        mask = media_attention_mask(locations, 16, num_media, only_attend_immediate_media=immediate)
        cached = media_attention_mask(locations, 3, num_media, immediate, use_cached_media=True)
        def sees(image: int, seen: int) -> bool:  # image index from 0; seen: images at or before the token
            return image + 1 == seen if immediate else image + 1 <= seen

        for b in range(4):
            for t in range(16):
                for m in range(num_media):
                    assert bool(mask[b, t, m]) == sees(m, int(locations[b, : t + 1].sum())), (b, t, m)
                    assert bool(cached[b, min(t, 2), m]) == sees(m, int(locations[b].sum())), (b, t, m)


@pytest.mark.parametrize("only_attend_immediate_media", [True, False], ids=["immediate", "all_previous"])
@torch.no_grad()
def test_which_images_a_token_sees(only_attend_immediate_media):
    """Changing every image leaves text before the first image as it was (it sees nothing: the block is then its
    feed-forward alone); changing only the first image also leaves text after the second image unchanged when
    only the immediate image is seen, and changes it otherwise."""
    block = GatedCrossAttentionBlock(**BLOCK_KWARGS, only_attend_immediate_media=only_attend_immediate_media)
    block = randomize_(block, seed=6)
    text, media = inputs(seed=7)
    out = block(text, media, media_locations=MEDIA_LOCATIONS)
    other_images = torch.randn_like(media)
    changed = (block(text, other_images, media_locations=MEDIA_LOCATIONS) != out).any(-1)  # (B, T)
    assert torch.equal(changed, MEDIA_LOCATIONS.cumsum(1) > 0)
    feed_forward_only = text + block.ff_gate.tanh() * block.mlp(block.norm2(text))
    before = MEDIA_LOCATIONS.cumsum(1) == 0
    assert torch.equal(out[before], feed_forward_only[before])

    first_image_changed = media.clone()
    first_image_changed[:, 0] = torch.randn_like(media[:, 0])
    changed = (block(text, first_image_changed, media_locations=MEDIA_LOCATIONS) != out).any(-1)
    sees_first = MEDIA_LOCATIONS.cumsum(1) == 1 if only_attend_immediate_media else MEDIA_LOCATIONS.cumsum(1) >= 1
    assert torch.equal(changed, sees_first)


def test_closed_gates_are_identity_and_open_first():
    """At initialisation (gates 0) the block returns the text exactly; the first gradients reach only the gates,
    as in Flamingo, where the model starts as the frozen LM."""
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(**BLOCK_KWARGS)
    text, media = inputs(seed=8)
    text.requires_grad_(True)
    out = block(text, media, media_locations=MEDIA_LOCATIONS)
    assert torch.equal(out, text)
    (out * torch.randn_like(out)).sum().backward()
    assert block.attn_gate.grad.abs().item() > 0 and block.ff_gate.grad.abs().item() > 0
    for name, parameter in block.named_parameters():
        if not name.endswith("gate"):
            assert not parameter.grad.any(), name


def test_open_flamingo_checkpoint_names():
    """A whole OpenFlamingo checkpoint (as `Flamingo.state_dict()` names it, with an MPT LM and cross-attention
    before LM layer 1 of 2): perceiver, the gated block of each wrapped layer and the LM go to their places; the
    duplicate module lists are dropped; DDP's `module.` prefix is removed."""
    helpers = open_flamingo_helpers()
    torch.manual_seed(0)
    resampler = helpers.PerceiverResampler(**RESAMPLER_KWARGS)
    block = helpers.GatedCrossAttentionBlock(**BLOCK_KWARGS)
    checkpoint = {f"perceiver.{key}": value for key, value in resampler.state_dict().items()}
    for key, value in block.state_dict().items():
        checkpoint[f"lang_encoder.transformer.blocks.1.gated_cross_attn_layer.{key}"] = value
        checkpoint[f"lang_encoder.gated_cross_attn_layers.1.{key}"] = value
    lm = {
        "transformer.wte.weight": torch.randn(11, DIM),
        "transformer.blocks.{i}.ln_1.weight": torch.randn(DIM),
        "transformer.blocks.{i}.attn.Wqkv.weight": torch.randn(3 * DIM, DIM),
        "transformer.blocks.{i}.attn.q_ln.weight": torch.randn(DIM),
        "transformer.blocks.{i}.mlp.mlp_down.weight": torch.randn(DIM, 4 * DIM),
        "transformer.ln_f.weight": torch.randn(DIM),
    }
    for key, value in lm.items():
        for i in range(2):
            checkpoint[f"lang_encoder.{key}".replace("blocks.{i}.", f"blocks.{i}.decoder_layer.")] = value
            checkpoint[f"lang_encoder.{key}".replace("transformer.blocks.{i}.", f"old_decoder_blocks.{i}.")] = value
    checkpoint = {f"module.{key}": value for key, value in checkpoint.items()}

    ours = open_flamingo_to_ours(checkpoint)
    our_resampler = PerceiverResampler(**RESAMPLER_KWARGS)
    our_block = GatedCrossAttentionBlock(**BLOCK_KWARGS)
    expected_keys = {f"perceiver.{key}" for key in our_resampler.state_dict()}
    expected_keys |= {f"gated_cross_attn_layers.1.{key}" for key in our_block.state_dict()}
    expected_keys |= {"lang_model.token_embedding.weight", "lang_model.norm.weight"}
    for i in range(2):
        names = ("norm1.weight", "attn.qkv.weight", "attn.q_norm.weight", "mlp.fc2.weight")
        expected_keys |= {f"lang_model.transformer.blocks.{i}.{name}" for name in names}
    assert set(ours) == expected_keys
    our_resampler.load_state_dict({key[len("perceiver.") :]: ours[key] for key in ours if key.startswith("perceiver.")})
    assert torch.equal(our_resampler.blocks[1].attn.kv.weight, resampler.layers[1][0].to_kv.weight)
    assert torch.equal(ours["gated_cross_attn_layers.1.mlp.fc1.weight"], block.ff[1].weight)
    assert ours["lang_model.transformer.blocks.0.attn.qkv.weight"] is lm["transformer.blocks.{i}.attn.Wqkv.weight"]
