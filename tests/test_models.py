"""Behaviour of models/: shapes, masks, parity with hand-written attention, checkpointing, presets."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossmodal.models import MODELS, create_model
from crossmodal.models.layers import Attention, Block, CrossAttention, DropPath, QuickGELU
from crossmodal.models.resnet import AttentionPool2d, ModifiedResNet
from crossmodal.models.text import TextTransformer
from crossmodal.models.vit import VisionTransformer


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def naive_attention(q, k, v, allowed=None):
    """q (T, d), k/v (S, d), allowed (T, S) bool -> (T, d), by the textbook formula."""
    scores = q @ k.T / math.sqrt(q.shape[-1])
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1) @ v


def naive_multihead(q, k, v, num_heads, allowed=None):
    """q (B, T, H*d), k/v (B, S, H*d), heads split by slicing channels, looped over batch and heads."""
    head_dim = q.shape[-1] // num_heads
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for h in range(num_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            mask = None if allowed is None else allowed[b]
            out[b, :, cols] = naive_attention(q[b, :, cols], k[b, :, cols], v[b, :, cols], mask)
    return out


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("head_dim", [None, 4])
def test_attention_matches_naive_reference_with_bool_mask(head_dim):
    dim, heads, B, T = 16, 2, 2, 5
    attn = Attention(dim, num_heads=heads, head_dim=head_dim).eval()
    x = torch.randn(B, T, dim)
    allowed = torch.rand(B, T, T) > 0.4
    allowed[:, :, 0] = True  # every query keeps at least one key
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).chunk(3, dim=-1)
    expected = attn.proj(naive_multihead(q, k, v, heads, allowed))
    out = attn(x, attn_mask=allowed[:, None])  # (B, 1, T, T) broadcasts over heads
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    additive = torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], float("-inf"))
    torch.testing.assert_close(attn(x, attn_mask=additive), expected, atol=1e-5, rtol=1e-5)


def test_attention_row_with_one_allowed_key_returns_that_value():
    dim, heads, T = 8, 2, 4
    attn = Attention(dim, num_heads=heads).eval()
    x = torch.randn(1, T, dim)
    allowed = torch.ones(T, T, dtype=torch.bool)
    allowed[1] = False
    allowed[1, 3] = True  # query 1 may only look at key 3
    _, _, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).chunk(3, dim=-1)
    out = attn(x, attn_mask=allowed)
    torch.testing.assert_close(out[0, 1], attn.proj(v[0, 3]), atol=1e-5, rtol=1e-5)


def test_attention_is_causal_equals_lower_triangular_mask():
    attn = Attention(16, num_heads=4).eval()
    x = torch.randn(2, 6, 16)
    tril = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, is_causal=True), attn(x, attn_mask=tril), atol=1e-6, rtol=1e-6)


def test_cross_attention_matches_naive_reference():
    dim, context_dim, heads, B, T, S = 16, 12, 4, 2, 3, 7
    cross = CrossAttention(dim, context_dim=context_dim, num_heads=heads, head_dim=2).eval()
    x, context = torch.randn(B, T, dim), torch.randn(B, S, context_dim)
    allowed = torch.rand(B, T, S) > 0.3
    allowed[:, :, -1] = True
    q = F.linear(x, cross.q.weight, cross.q.bias)
    k, v = F.linear(context, cross.kv.weight, cross.kv.bias).chunk(2, dim=-1)
    expected = cross.proj(naive_multihead(q, k, v, heads, allowed))
    torch.testing.assert_close(cross(x, context, attn_mask=allowed[:, None]), expected, atol=1e-5, rtol=1e-5)
    expected_unmasked = cross.proj(naive_multihead(q, k, v, heads))
    torch.testing.assert_close(cross(x, context), expected_unmasked, atol=1e-5, rtol=1e-5)


def test_quick_gelu_formula():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(QuickGELU()(x), x / (1 + torch.exp(-1.702 * x)))
    assert (QuickGELU()(x) - F.gelu(x)).abs().max() < 0.03  # an approximation of GELU


def test_drop_path_drops_whole_samples_in_training_only():
    drop = DropPath(0.5)
    x = torch.ones(64, 3, 4)
    y = drop(x)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}  # dropped or rescaled by 1/keep
    assert (per_sample == per_sample[:, :1]).all()
    assert torch.equal(drop.eval()(x), x)


def test_block_cross_attention_runs_only_with_context():
    block = Block(16, num_heads=4, cross_attention=True, context_dim=8, init_values=1e-1).eval()
    plain = Block(16, num_heads=4, init_values=1e-1).eval()
    plain.load_state_dict(block.state_dict(), strict=False)
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 8)
    torch.testing.assert_close(block(x), plain(x))  # unimodal mode: the same block without the image
    assert not torch.allclose(block(x, context=context), block(x))
    # Flamingo masks every image token for text before the first image: the output must stay finite (CPU SDPA
    # returns zeros for a fully masked row, so the cross-attention update is just `proj.bias`).
    nothing = torch.zeros(1, 1, 5, 3, dtype=torch.bool)
    h = x + block.ls1(block.attn(block.norm1(x))) + block.ls_cross(block.cross_attn.proj.bias)
    expected = h + block.ls2(block.mlp(block.norm2(h)))
    torch.testing.assert_close(block(x, context=context, context_mask=nothing), expected)


# ---------------------------------------------------------------- towers


def test_vit_shapes():
    vit = VisionTransformer(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, output_dim=24)
    images = torch.randn(3, 3, 32, 32)
    assert vit.forward_features(images).shape == (3, 1 + 16, 32)
    assert vit(images).shape == (3, 24)


def test_vit_blip_style_stem_has_patch_bias_and_no_pre_norm():
    vit = VisionTransformer(image_size=32, patch_size=16, width=32, depth=1, num_heads=2, norm_pre=False, patch_bias=True)
    keys = vit.state_dict().keys()
    assert "patch_embed.proj.bias" in keys and not any(k.startswith("norm_pre") for k in keys)
    assert vit.cls_token.shape == (1, 1, 32) and vit.pos_embed.shape == (1, 5, 32)


def test_vit_conv_stem_gives_the_patch_grid_and_is_independent_of_the_batch():
    vit = VisionTransformer(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, output_dim=24, stem="conv")
    strided = [m for m in vit.patch_embed.convs if isinstance(m, nn.Conv2d)]
    assert [(m.stride, m.out_channels) for m in strided] == [((2, 2), 16), ((2, 2), 16), ((2, 2), 32)]
    images = torch.randn(4, 3, 32, 32)
    assert vit.patch_embed(images).shape == (4, 16, 32) and vit.pos_embed.shape == (1, 17, 32)
    vit.train()  # GroupNorm, not BatchNorm: a sample's tokens do not depend on the rest of its batch
    torch.testing.assert_close(vit(images)[:1], vit(images[:1]))
    with pytest.raises(ValueError, match="power-of-two patch_size; got 12"):
        VisionTransformer(image_size=36, patch_size=12, width=32, depth=1, num_heads=2, stem="conv")
    with pytest.raises(ValueError, match="unknown ViT stem 'cnn'; valid: patch, conv"):
        VisionTransformer(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, stem="cnn")
    assert create_model("BLIP-tiny", vision_stem="conv").visual_encoder.patch_embed.num_patches == 64
    with pytest.raises(ValueError, match="vision_stem='conv' is a ViT option"):
        create_model("RN-tiny", vision_stem="conv")


def test_resnet_shapes_and_zero_init_residuals():
    resnet = ModifiedResNet(layers=(1, 2, 1, 1), output_dim=24, heads=4, image_size=64, width=8)
    images = torch.randn(2, 3, 64, 64)
    assert resnet.forward_features(images).shape == (2, 2 * 2, 8 * 32)
    assert resnet(images).shape == (2, 24)
    for name, param in resnet.named_parameters():
        if name.startswith("layer") and name.endswith("bn3.weight"):
            assert torch.count_nonzero(param) == 0, name
    with pytest.raises(NotImplementedError):
        resnet.set_grad_checkpointing(True)


def test_attention_pool_matches_naive_reference():
    pool = AttentionPool2d(spatial_dim=3, embed_dim=16, num_heads=4, output_dim=10)
    tokens = torch.randn(2, 9, 16)  # (B, HW, C)
    x = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + pool.positional_embedding
    q = F.linear(x[:, :1], pool.q_proj.weight, pool.q_proj.bias)
    k = F.linear(x, pool.k_proj.weight, pool.k_proj.bias)
    v = F.linear(x, pool.v_proj.weight, pool.v_proj.bias)
    expected = pool.c_proj(naive_multihead(q, k, v, num_heads=4))[:, 0]
    torch.testing.assert_close(pool(tokens), expected, atol=1e-5, rtol=1e-5)


def test_attention_pool_all_tokens_matches_naive_reference():
    """Every position queries (BLIP's image tokens from a ResNet); the first output is the pooled embedding."""
    pool = AttentionPool2d(spatial_dim=3, embed_dim=16, num_heads=4, output_dim=10)
    tokens = torch.randn(2, 9, 16)
    x = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + pool.positional_embedding
    q, k, v = (F.linear(x, proj.weight, proj.bias) for proj in (pool.q_proj, pool.k_proj, pool.v_proj))
    expected = pool.c_proj(naive_multihead(q, k, v, num_heads=4))  # (B, 1 + HW, 10)
    out = pool(tokens, all_tokens=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 0], pool(tokens), atol=1e-6, rtol=1e-6)


def small_text_tower(**kwargs):
    return TextTransformer(vocab_size=50, context_length=12, width=32, depth=2, num_heads=4, output_dim=16, **kwargs).eval()


def test_text_shapes_for_short_sequences():
    text = small_text_tower()
    tokens = torch.randint(1, 50, (3, 7))
    assert text.forward_features(tokens).shape == (3, 7, 32)
    assert text(tokens).shape == (3, 16)
    with pytest.raises(ValueError, match="at most 12"):
        text(torch.randint(1, 50, (1, 13)))


def test_text_is_causal():
    text = small_text_tower()
    tokens = torch.randint(1, 50, (2, 10))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] % 49) + 1  # a different non-pad id
    before, after = text.forward_features(tokens), text.forward_features(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_text_pools_at_last_non_pad_token_and_ignores_padding():
    text = small_text_tower()
    sot, eot = 48, 49  # CLIP-like: end-of-text is the largest id, pad is 0
    sentence = torch.tensor([[sot, 5, 17, 3, eot], [sot, 8, eot, 0, 0]])  # the second already carries pads
    padded = F.pad(sentence, (0, 6), value=0)
    torch.testing.assert_close(text(sentence), text(padded), atol=1e-5, rtol=1e-5)
    features = text.forward_features(padded)
    at_argmax = features[torch.arange(2), padded.argmax(dim=-1)] @ text.proj  # OpenAI's pooling
    torch.testing.assert_close(text(padded), at_argmax)


def test_text_pooling_works_when_eos_is_not_the_largest_id():
    text = small_text_tower(pad_id=3)
    tokens = torch.tensor([[1, 40, 41, 2, 3, 3]])  # sentencepiece-like: eos = 2, pad = 3
    expected = text.forward_features(tokens)[:, 3] @ text.proj
    torch.testing.assert_close(text(tokens), expected)


def test_text_pools_at_the_end_token_when_the_pad_id_occurs_inside_the_text():
    text = small_text_tower()
    sot, eot = 48, 49  # CLIP's BPE: pad 0 is also the byte "!" ("wow!!" -> ..., 0, ..., eot)
    tokens = torch.tensor([[sot, 5, 0, 0, 17, eot, 0, 0], [sot, 8, 0, eot, 0, 0, 0, 0]])
    features = text.forward_features(tokens)
    torch.testing.assert_close(text(tokens), features[torch.arange(2), tokens.argmax(dim=-1)] @ text.proj)


def test_dropping_padding_after_the_longest_text_is_exact():
    text = small_text_tower()
    tokens = torch.tensor([[48, 5, 17, 49, 0, 0, 0, 0, 0, 0, 0, 0], [48, 8, 49, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    full = text.forward_features(tokens)[torch.arange(2), tokens.argmax(dim=-1)] @ text.proj  # all 12 positions
    torch.testing.assert_close(text(tokens), full, atol=1e-6, rtol=1e-6)


def test_text_init_follows_openai():
    text = TextTransformer(vocab_size=1024, context_length=32, width=128, depth=3, num_heads=4, output_dim=64)
    assert abs(text.token_embedding.weight.std().item() - 0.02) < 0.002
    assert abs(text.pos_embed.std().item() - 0.01) < 0.002
    assert abs(text.transformer.blocks[0].mlp.fc2.weight.std().item() - 128**-0.5 * 6**-0.5) < 0.003


# ---------------------------------------------------------------- CLIP and presets


@pytest.mark.parametrize("name", ["ViT-tiny", "RN-tiny"])
def test_clip_tiny_forward(name):
    model = create_model(name).eval()
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 1024, (2, 32))
    out = model(images, tokens)
    assert out["image_features"].shape == out["text_features"].shape == (2, 128)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(2))
    assert out["logit_bias"] is None
    assert model.encode_image(images).shape == (2, 128)
    torch.testing.assert_close(model.encode_text(tokens, normalize=True).norm(dim=-1), torch.ones(2))


def test_logit_scale_starts_at_one_over_007_and_keeps_its_gradient_above_100():
    # training clamps the parameter after each step (tests/test_train.py); forward must not, or a scale that
    # passed ln 100 would get no gradient and could never come back
    model = create_model("ViT-tiny").eval()
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 1024, (2, 8))
    assert model(images, tokens)["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    out = model(images, tokens)
    assert out["logit_scale"].item() == pytest.approx(1000.0, rel=1e-5)
    from crossmodal.losses import clip_loss

    clip_loss(out["image_features"], out["text_features"], out["logit_scale"]).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0


def test_siglip_init():
    model = create_model("ViT-tiny", init_logit_scale=math.log(10), init_logit_bias=-10).eval()
    out = model(torch.randn(1, 3, 64, 64), torch.randint(1, 1024, (1, 8)))
    assert out["logit_scale"].item() == pytest.approx(10.0, rel=1e-5)
    assert out["logit_bias"].item() == -10.0


def test_grad_checkpointing_gives_same_outputs_and_gradients():
    model = create_model("ViT-tiny")
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.visual.transformer.grad_checkpointing and checkpointed.text.transformer.grad_checkpointing
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 1024, (2, 16))
    outputs, grads = [], []
    for m in (model, checkpointed):
        out = m(images, tokens)
        (out["image_features"] @ out["text_features"].T * out["logit_scale"]).sum().backward()
        outputs.append(out)
        grads.append({name: p.grad for name, p in m.named_parameters()})
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(outputs[0][key], outputs[1][key])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_create_model_overrides():
    model = create_model("ViT-tiny", image_size=32, context_length=16, vocab_size=100, act_layer="quick_gelu", embed_dim=64)
    assert model.visual.pos_embed.shape == (1, 1 + 16, 128)
    assert model.text.token_embedding.num_embeddings == 100 and model.text.pos_embed.shape == (16, 128)
    assert isinstance(model.text.transformer.blocks[0].mlp.act, QuickGELU)
    assert model(torch.randn(1, 3, 32, 32), torch.randint(1, 100, (1, 16)))["image_features"].shape == (1, 64)
    assert isinstance(create_model("ViT-tiny").visual.transformer.blocks[0].mlp.act, nn.GELU)
    dropped = create_model("ViT-tiny", drop_path=0.1, grad_checkpointing=True)
    assert dropped.visual.transformer.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert isinstance(dropped.visual.transformer.blocks[0].drop_path1, nn.Identity)  # rate 0 at the first block


def test_create_model_typos_name_the_closest_options():
    with pytest.raises(ValueError, match="ViT-B-32"):
        create_model("ViT-B32")
    with pytest.raises(ValueError, match="image_size"):
        create_model("ViT-tiny", image_sise=32)
    with pytest.raises(ValueError, match="quick_gelu"):
        create_model("ViT-tiny", act_layer="quickgelu")


@pytest.mark.parametrize(
    "name, params, tensors",
    [
        ("ViT-B-32", 151_277_313, 302),  # OpenAI's count: verified in clip_anchors.md B.1/B.2
        ("ViT-B-16", 149_620_737, 302),
        ("ViT-L-14", 427_616_513, 446),
        ("RN50", 102_007_137, 489),  # B.3: 489 tensors including BatchNorm buffers
        ("RN101", 119_688_033, None),
        ("RN50x4", 178_300_601, None),
    ],
)
def test_paper_presets_match_openai_parameter_counts(name, params, tensors):
    for variant in (name, f"{name}-quickgelu"):
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = create_model(variant)
        assert sum(p.numel() for p in model.parameters()) == params
        if tensors is not None:
            assert len(model.state_dict()) == tensors
    assert MODELS[f"{name}-quickgelu"].act_layer == "quick_gelu"
