"""The MPT-style decoder LM (models/lm.py, the MPT key maps of models/convert.py): logits equal transformers'
MptForCausalLM on random weights loaded from a saved HF folder (power-of-two and other head counts, left
padding), the key/value cache (logits and generated tokens, against HF's generate too), MosaicGPT's layout with
QK LayerNorm against an independent computation, and the MPT-1B preset."""
import json
import math
import re

import pytest
import torch
from torch import nn

from crossmodal.config import BadInput
from crossmodal.models import released_folder_problem
from crossmodal.models.generation import generate
from crossmodal.models.layers import KVCache
from crossmodal.models.lm import LM_MODELS, DecoderLM, alibi_slopes, build_lm, load_mpt, mpt_config_to_kwargs
from crossmodal.models.lm import preset_differences as lm_preset_differences

transformers = pytest.importorskip("transformers")  # test-only reference

VOCAB, EOS, PAD = 97, 3, 0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Norm weights around 1, matrices small, embeddings large enough that logits spread (HF's init leaves norms
    at identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name or "_ln" in name or "ln_" in name:
                tensor.copy_(1 + 0.1 * noise)
            else:
                tensor.copy_((0.5 if "wte" in name else 0.1) * noise)
    return model.eval()


@pytest.fixture(scope="module", params=[4, 6], ids=["heads4", "heads6"])
def reference(request, tmp_path_factory):
    """A random HF MptForCausalLM saved as a HF folder, and ours loaded from that folder. 6 heads exercises the
    slopes of a head count that is not a power of two."""
    config = transformers.MptConfig(
        d_model=48, n_heads=request.param, n_layers=2, expansion_ratio=4, max_seq_len=24, vocab_size=VOCAB,
        attn_config={"alibi": True, "alibi_bias_max": 8}, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS,
    )  # fmt: skip
    hf = randomize_(transformers.MptForCausalLM(config), seed=request.param)
    folder = tmp_path_factory.mktemp(f"mpt{request.param}")
    hf.save_pretrained(folder)
    return hf, load_mpt(folder)


def assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    difference = (got - expected).abs().max().item()
    relative = difference / expected.abs().max().item()
    assert relative < rtol, f"max abs diff {difference:.3g}, relative to the largest value {relative:.3g}"


def random_tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_equal_transformers(reference):
    hf, ours = reference
    tokens = random_tokens(2, 17, seed=0)
    assert_close(ours(tokens), hf(tokens).logits)


@torch.no_grad()
def test_left_padding_equals_transformers(reference):
    hf, ours = reference
    tokens = random_tokens(2, 12, seed=1)
    padding_mask = torch.ones_like(tokens, dtype=torch.bool)
    padding_mask[0, :4] = False  # the first row is 4 tokens shorter, padded on the left
    tokens[0, :4] = PAD
    got = ours(tokens, padding_mask=padding_mask)
    expected = hf(tokens, attention_mask=padding_mask.long()).logits
    assert got.isfinite().all()
    assert_close(got[padding_mask], expected[padding_mask])
    # Padding changes nothing at the real tokens: the short row alone gives the same logits.
    assert_close(got[0, 4:], ours(tokens[:1, 4:])[0])


@torch.no_grad()
def test_cached_logits_equal_uncached(reference):
    _, ours = reference
    tokens = random_tokens(2, 10, seed=2)
    full = ours(tokens)
    cache = KVCache(ours.depth)
    steps = [ours(tokens[:, :6], cache=cache)] + [ours(tokens[:, i : i + 1], cache=cache) for i in range(6, 10)]
    assert cache.length == 10
    assert_close(torch.cat(steps, dim=1), full)


@torch.no_grad()
def test_generation_cached_equals_uncached_and_transformers(reference):
    hf, ours = reference
    prompt = random_tokens(2, 4, seed=3)
    context = torch.zeros(2, 0, 1)  # a pure LM has no context; generate() only copies it to the beams

    def decode(tokens: torch.Tensor, context: torch.Tensor, cache) -> torch.Tensor:
        return ours(tokens, cache=cache)

    for num_beams in (1, 3):
        kwargs = dict(num_layers=ours.depth, eos_id=EOS, pad_id=PAD, max_length=14, num_beams=num_beams)
        cached = generate(decode, prompt, context, use_cache=True, **kwargs)
        uncached = generate(decode, prompt, context, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)
        expected = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_length=14, num_beams=num_beams, do_sample=False,
            eos_token_id=EOS, pad_token_id=PAD,
        )  # fmt: skip
        assert torch.equal(cached, expected[:, : cached.shape[1]]), (cached, expected)


def mosaic_gpt_logits(weights: dict, config: dict, tokens: torch.Tensor) -> torch.Tensor:
    """MosaicGPT's forward (mosaicml/examples v0.0.4 `mosaic_gpt.py`, `attention.py` with attn_impl "torch") written
    out on the raw weights: bias-free LayerNorms, QK LayerNorm over the full width, ALiBi `slope * (j - (S - 1))`
    with slopes 2^(-8 h / n), a causal mask, output tied to `wte`."""
    width, heads, (batch, length) = config["d_model"], config["n_heads"], tokens.shape

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return nn.functional.layer_norm(x, (width,), weights[name])

    slopes = 1.0 / 2 ** (torch.arange(1, heads + 1) * (config["alibi_bias_max"] / heads))
    alibi = torch.arange(1 - length, 1).view(1, 1, 1, length) * slopes.view(1, heads, 1, 1)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)
    x = weights["transformer.wte.weight"][tokens]
    for layer in range(config["n_layers"]):
        prefix = f"transformer.blocks.{layer}."
        q, k, v = (norm(x, prefix + "ln_1.weight") @ weights[prefix + "attn.Wqkv.weight"].T).chunk(3, dim=-1)
        q, k = norm(q, prefix + "attn.q_ln.weight"), norm(k, prefix + "attn.k_ln.weight")
        q, k, v = (t.view(batch, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(width / heads) + alibi
        attended = scores.masked_fill(future, -float("inf")).softmax(dim=-1) @ v  # (B, heads, T, head_dim)
        x = x + attended.transpose(1, 2).reshape(batch, length, width) @ weights[prefix + "attn.out_proj.weight"].T
        hidden = nn.functional.gelu(norm(x, prefix + "ln_2.weight") @ weights[prefix + "mlp.mlp_up.weight"].T)
        x = x + hidden @ weights[prefix + "mlp.mlp_down.weight"].T
    return norm(x, "transformer.ln_f.weight") @ weights["transformer.wte.weight"].T


def mosaic_gpt_folder(folder, **config_changes) -> tuple[dict, dict]:
    """A random folder of mpt-1b-redpajama-200b's layout (MosaicGPT remote code, `pytorch_model.bin`) with its QK
    LayerNorm: (config, weights)."""
    config = {
        "model_type": "mosaic_gpt", "d_model": 32, "n_heads": 4, "n_layers": 2, "mlp_ratio": 4, "max_seq_len": 16,
        "vocab_size": VOCAB, "alibi": True, "alibi_bias_max": 8, "attn_qk_ln": True, "attn_clip_qkv": None,
        "softmax_scale": None, "logit_scale": None, "no_bias": True, "prefix_lm": False, **config_changes,
    }  # fmt: skip
    hidden = 32 * config["mlp_ratio"]
    generator = torch.Generator().manual_seed(4)
    shapes = {"transformer.wte.weight": (VOCAB, 32), "transformer.ln_f.weight": (32,)}
    for layer in range(2):
        prefix = f"transformer.blocks.{layer}."
        shapes.update({
            prefix + "ln_1.weight": (32,), prefix + "attn.Wqkv.weight": (96, 32), prefix + "attn.q_ln.weight": (32,),
            prefix + "attn.k_ln.weight": (32,), prefix + "attn.out_proj.weight": (32, 32),
            prefix + "ln_2.weight": (32,), prefix + "mlp.mlp_up.weight": (hidden, 32),
            prefix + "mlp.mlp_down.weight": (32, hidden),
        })  # fmt: skip
    weights = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    weights = {name: 1 + 0.1 * value if value.ndim == 1 else 0.2 * value for name, value in weights.items()}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(weights, folder / "pytorch_model.bin")
    return config, weights


@torch.no_grad()
def test_mosaic_gpt_layout_with_qk_layernorm(tmp_path):
    """mpt-1b-redpajama-200b's layout with its QK LayerNorm."""
    config, weights = mosaic_gpt_folder(tmp_path)
    ours = load_mpt(tmp_path)
    assert ours.transformer.blocks[0].attn.q_norm.weight.shape == (32,)
    tokens = random_tokens(2, 11, seed=5)
    assert_close(ours(tokens), mosaic_gpt_logits(weights, config, tokens))


def test_alibi_slopes_match_transformers():
    for heads in (1, 4, 6, 12, 16):
        expected = transformers.models.mpt.modeling_mpt.build_mpt_alibi_tensor(heads, 2)[:, 0, 0] * -1  # slope * 1
        assert torch.allclose(alibi_slopes(heads), expected, rtol=1e-6), heads


def test_mpt_1b_preset_and_config():
    """The preset equals what mpt-1b-redpajama-200b's config.json (MosaicGPT layout) gives, and has its 1.3B
    parameters (model card). Built on the meta device: no memory is allocated."""
    config = {
        "model_type": "mosaic_gpt", "d_model": 2048, "n_heads": 16, "n_layers": 24, "mlp_ratio": 4,
        "max_seq_len": 2048, "vocab_size": 50432, "alibi": True, "alibi_bias_max": 8, "attn_qk_ln": True,
        "attn_clip_qkv": None, "softmax_scale": None, "logit_scale": None, "no_bias": True,
    }  # fmt: skip
    kwargs = mpt_config_to_kwargs(config)
    assert {key: kwargs[key] for key in LM_MODELS["mpt-1b-redpajama-200b"]} == LM_MODELS["mpt-1b-redpajama-200b"]
    with torch.device("meta"):
        model = build_lm("mpt-1b-redpajama-200b")
    assert sum(parameter.numel() for parameter in model.parameters()) == 1_311_442_944
    assert not any(name.endswith(".bias") for name in model.state_dict())
    with pytest.raises(ValueError, match="clip_qkv"):
        mpt_config_to_kwargs({**config, "attn_clip_qkv": 6.0})


def test_trains_from_scratch():
    """A few steps of plain next-token training on one repeated sequence drive the loss down."""
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=VOCAB, context_length=16, width=32, depth=2, num_heads=4)
    tokens = random_tokens(4, 16, seed=6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@torch.no_grad()
def test_folder_heads_and_mlp_ratio_are_built_as_its_config_says(tmp_path):
    """8 heads and an MLP of 3x (transformers' MptForCausalLM builds 4x whatever expansion_ratio says, so the
    reference is MosaicGPT's forward written out); a training run from it is refused: it would resume as lm-tiny."""
    config, weights = mosaic_gpt_folder(tmp_path, n_heads=8, mlp_ratio=3)
    ours = load_mpt(tmp_path)
    assert ours.num_heads == 8 and ours.transformer.blocks[0].mlp.fc1.out_features == 96
    tokens = random_tokens(2, 11, seed=5)
    assert_close(ours(tokens), mosaic_gpt_logits(weights, config, tokens))
    problem = released_folder_problem("model.pretrained", tmp_path, "lm-tiny")
    assert "n_heads=8 (the preset's 4)" in problem and "expansion_ratio=3.0 (the preset's 4.0)" in problem


@pytest.mark.parametrize("changes, named", [
    ({"attn_config": {"alibi": True, "attn_type": "multiquery_attention"}}, "attn_config.attn_type='multiquery_attention'"),
    ({"attn_config": {"alibi": True, "rope": True}}, "rope=True"),  # unknown: refused, not ignored
    ({"norm_type": "rmsnorm"}, "norm_type='rmsnorm'"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
    ({"logit_scale": "inv_sqrt_d_model"}, "logit_scale='inv_sqrt_d_model'"),
    ({"alibi": False}, "alibi=False"),
    ({"n_heads": 5}, "d_model=32 is not a multiple of n_heads=5"),
    ({"n_layers": "2"}, "n_layers='2'"),
])  # fmt: skip
def test_folder_config_this_model_cannot_be_is_refused_naming_the_field(tmp_path, changes, named):
    mosaic_gpt_folder(tmp_path, **changes)
    with pytest.raises(BadInput, match=re.escape(named)):
        load_mpt(tmp_path)


def test_transformers_mpt_config_without_alibi_takes_transformers_default():
    """transformers' MptAttentionConfig turns ALiBi on by default, which its 4.x save_pretrained may leave out;
    MosaicML's remote code (auto_map) turns it off, so there it must be stated."""
    config = transformers.MptConfig(d_model=48, n_heads=4, n_layers=2, max_seq_len=24, vocab_size=VOCAB).to_dict()
    del config["attn_config"]["alibi"]
    assert mpt_config_to_kwargs(config)["num_heads"] == 4
    with pytest.raises(BadInput, match="alibi=None"):
        mpt_config_to_kwargs({**config, "auto_map": {"AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"}})


def test_mpt_7b_config_gives_the_preset():
    """mosaicml/mpt-7b's config.json (MosaicML's remote-code MPTConfig), every field of it: read or ignored on
    purpose, and what is read is the preset."""
    config = {
        "architectures": ["MPTForCausalLM"],
        "attn_config": {
            "alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0, "attn_type": "multihead_attention",
            "attn_uses_sequence_id": False, "clip_qkv": None, "prefix_lm": False, "qk_ln": False, "softmax_scale": None,
        },
        "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
        "d_model": 4096, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4,
        "init_config": {
            "emb_init_std": None, "emb_init_uniform_lim": None, "fan_mode": "fan_in", "init_div_is_residual": True,
            "init_gain": 0, "init_nonlinearity": "relu", "init_std": 0.02, "name": "kaiming_normal_", "verbose": 0,
        },
        "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": 2048, "model_type": "mpt",
        "n_heads": 32, "n_layers": 32, "no_bias": True, "norm_type": "low_precision_layernorm", "resid_pdrop": 0,
        "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "bfloat16", "transformers_version": "4.28.1",
        "use_cache": False, "verbose": 0, "vocab_size": 50432,
    }  # fmt: skip
    kwargs = mpt_config_to_kwargs(config)
    assert {key: kwargs[key] for key in LM_MODELS["mpt-7b"]} == LM_MODELS["mpt-7b"]
    assert lm_preset_differences("mpt-7b", kwargs) == []
