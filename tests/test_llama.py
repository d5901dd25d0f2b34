"""The LLaMA decoder (models/llama.py, the LLaMA key map of models/convert.py, LLaMA's options of models/layers.py):
logits equal transformers' LlamaForCausalLM on random tiny configs saved as HF folders (grouped-query and multi-head
attention, tied and untied embeddings, rope_scaling linear and llama3, a non-default rope_theta; sharded safetensors
with an index, bf16 and pytorch_model.bin files), left padding, the key/value cache (logits, and greedy and beam
tokens against HF's generate), `create_lm`, and one-line refusals of folders this model cannot be."""
import json
import os

import pytest
import torch
from torch import nn

from crossmodal.config import BadInput
from crossmodal.models import create_lm
from crossmodal.models.generation import generate
from crossmodal.models.layers import KVCache, RotaryEmbedding
from crossmodal.models.llama import LLAMA_MODELS, LlamaLM, llama_config_to_kwargs, load_llama, preset_differences

transformers = pytest.importorskip("transformers")  # test-only reference

VOCAB, BOS, EOS, PAD = 101, 1, 2, 0
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS,
    pad_token_id=PAD,
)  # fmt: skip
# With head_dim 16 and theta 500, the wavelengths 6.3, 13.6, 29.6, 64.3, ... fall in each of llama3's three bands
# (kept below 64 / 4, divided above 64 / 1, interpolated between).
LLAMA3_SCALING = dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
CONFIGS = {  # name -> changes to BASE
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "tied": dict(tie_word_embeddings=True),
    "linear": dict(rope_scaling=dict(rope_type="linear", factor=2.5)),
    "llama3": dict(rope_scaling=LLAMA3_SCALING, rope_theta=500.0, max_position_embeddings=128),
    "theta": dict(rope_theta=1234.5, num_key_value_heads=1),
}


def hf_model(seed: int = 0, **changes) -> "transformers.LlamaForCausalLM":
    """A random LlamaForCausalLM: norm weights around 1, matrices small (HF's init leaves norms at identity)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **changes}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.copy_(1 + 0.1 * noise if "norm" in name else (0.5 if "embed" in name else 0.1) * noise)
    return model.eval()


def saved(model: nn.Module, folder, **kwargs) -> str:
    model.save_pretrained(folder, **kwargs)
    return os.fspath(folder)


@pytest.fixture(scope="module", params=list(CONFIGS))
def reference(request, tmp_path_factory):
    """(HF model, ours loaded from its saved folder, the folder)."""
    hf = hf_model(seed=len(request.param), **CONFIGS[request.param])
    folder = saved(hf, tmp_path_factory.mktemp(request.param))
    return hf, load_llama(folder), folder


def assert_close(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-4) -> None:
    difference = (got - expected).abs().max().item()
    assert difference < atol, f"max abs diff {difference:.3g} (largest value {expected.abs().max().item():.3g})"


def random_tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_equal_transformers(reference):
    hf, ours, _ = reference
    tokens = random_tokens(2, 40, seed=1)
    expected = hf(tokens).logits
    assert expected.std() > 0.1  # the logits spread: a wrong rotation or norm would show
    assert_close(ours(tokens), expected)


@torch.no_grad()
def test_left_padding_and_cache_equal_transformers(reference):
    """Left-padded rows: positions count real tokens, padding is never attended to; the cache continues them."""
    hf, ours, _ = reference
    tokens = random_tokens(3, 12, seed=2)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, :5], mask[2, :11] = False, False  # row 2 has one real token
    tokens = tokens.masked_fill(~mask, PAD)
    expected = hf(tokens, attention_mask=mask.long()).logits
    got = ours(tokens, padding_mask=mask)
    assert_close(got[mask], expected[mask])

    cache = KVCache(ours.depth)
    steps = [ours(tokens[:, :7], cache=cache, padding_mask=mask[:, :7])]
    for t in range(7, 12):
        steps.append(ours(tokens[:, t : t + 1], cache=cache, padding_mask=mask[:, : t + 1]))
    assert_close(torch.cat(steps, dim=1)[mask], expected[mask])


@torch.no_grad()
def test_cached_decoding_equals_full_forward_and_keeps_kv_heads(reference):
    hf, ours, _ = reference
    tokens = random_tokens(2, 10, seed=3)
    full = ours(tokens)
    cache = KVCache(ours.depth)
    steps = [ours(tokens[:, :4], cache=cache)] + [ours(tokens[:, t : t + 1], cache=cache) for t in range(4, 10)]
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5)
    assert cache.layers[0].key.shape[1] == hf.config.num_key_value_heads  # the cache holds the kv heads only


@torch.no_grad()
def test_generation_equals_transformers(reference):
    """Greedy and beam search, cached and not, and greedy on left-padded batched prompts (the decoder builds each
    step's padding mask, as Flamingo's does), give HF generate's tokens."""
    hf, ours, _ = reference
    prompt = random_tokens(2, 5, seed=4)
    context = torch.zeros(2, 0, 1)  # a pure LM has no context; generate() only copies it to the beams

    def decode(tokens: torch.Tensor, context: torch.Tensor, cache) -> torch.Tensor:
        return ours(tokens, cache=cache)

    for num_beams in (1, 3):
        kwargs = dict(num_layers=ours.depth, eos_id=EOS, pad_id=PAD, max_length=17, num_beams=num_beams)
        cached = generate(decode, prompt, context, use_cache=True, **kwargs)
        assert torch.equal(cached, generate(decode, prompt, context, use_cache=False, **kwargs))
        expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_length=17, num_beams=num_beams,
                               do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(cached, expected[:, : cached.shape[1]]), (cached, expected)

    prompt[0, :3] = PAD  # left padding
    prompt_mask = prompt != PAD

    def padded_decode(tokens: torch.Tensor, context: torch.Tensor, cache) -> torch.Tensor:
        num_keys = (cache.length if cache is not None else 0) + tokens.shape[1]
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(prompt.shape[0], num_keys - prompt.shape[1])], 1)
        return ours(tokens, cache=cache, padding_mask=mask)

    for use_cache in (True, False):
        got = generate(padded_decode, prompt, context, ours.depth, EOS, PAD, max_length=15, use_cache=use_cache)
        expected = hf.generate(prompt, attention_mask=prompt_mask.long(), max_length=15, do_sample=False,
                               eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(got, expected[:, : got.shape[1]]), (got, expected)


@torch.no_grad()
def test_nucleus_sampling_cached_equals_uncached():
    ours = create_lm("llama-tiny", vocab_size=VOCAB).eval()
    prompt = random_tokens(2, 4, seed=5)

    def decode(tokens: torch.Tensor, context: torch.Tensor, cache) -> torch.Tensor:
        return ours(tokens, cache=cache)

    runs = [generate(decode, prompt, torch.zeros(2, 0, 1), ours.depth, EOS, PAD, max_length=16, top_p=0.9, top_k=20,
                     generator=torch.Generator().manual_seed(0), use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("rope", [
    dict(rope_type="default", rope_theta=10000.0),
    dict(rope_type="linear", factor=4.0, rope_theta=10000.0),
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192, rope_theta=500000.0),  # LLaMA 3.1's
], ids=["default", "linear", "llama3"])  # fmt: skip
def test_rotary_frequencies_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=dict(rope))
    init = ROPE_INIT_FUNCTIONS.get(rope["rope_type"])
    if init is None:  # "default" has no entry: LlamaRotaryEmbedding computes it
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected = LlamaRotaryEmbedding(config).inv_freq
    else:
        expected = init(config, "cpu")[0]
    scaling = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    got = RotaryEmbedding(128, theta=rope["rope_theta"], scaling=scaling).inverse_frequencies()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_grad_checkpointing_gives_the_same_gradients():
    model = create_lm("llama-tiny", vocab_size=VOCAB)
    tokens = random_tokens(2, 12, seed=6)
    gradients = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(tokens).logsumexp(-1).mean().backward()
        gradients.append([parameter.grad.clone() for parameter in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*gradients))


@torch.no_grad()
def test_sharded_safetensors_with_index(tmp_path):
    hf = hf_model(seed=7)
    folder = saved(hf, tmp_path, max_shard_size="40KB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    assert len([name for name in os.listdir(folder) if name.endswith(".safetensors")]) > 2
    tokens = random_tokens(2, 9, seed=8)
    assert_close(load_llama(folder)(tokens), hf(tokens).logits)


@torch.no_grad()
def test_bf16_safetensors_load_as_fp32_and_pytorch_model_bin(tmp_path):
    hf = hf_model(seed=9).to(torch.bfloat16)
    folder = saved(hf, tmp_path / "bf16")
    ours = load_llama(folder)
    assert {parameter.dtype for parameter in ours.parameters()} == {torch.float32}
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = random_tokens(2, 9, seed=10)
    assert_close(ours(tokens), reference(tokens).logits)
    assert load_llama(folder, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16

    bin_folder = tmp_path / "bin"  # the layout of transformers 4.3x folders: pytorch_model.bin, rotary buffers kept
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((tmp_path / "bf16" / "config.json").read_text())
    state_dict = {key: value.clone() for key, value in reference.state_dict().items()}
    state_dict["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state_dict, bin_folder / "pytorch_model.bin")
    assert_close(load_llama(bin_folder)(tokens), reference(tokens).logits)


@torch.no_grad()
def test_create_lm(tmp_path):
    folder = saved(hf_model(seed=11), tmp_path)
    tokens = random_tokens(3, 6, seed=12)
    lm = create_lm("llama", pretrained=folder)
    assert isinstance(lm, LlamaLM) and lm(tokens).shape == (3, 6, VOCAB)
    assert create_lm("llama-tiny")(tokens).shape == (3, 6, LLAMA_MODELS["llama-tiny"]["vocab_size"])
    with pytest.raises(BadInput, match=r"another model than the preset Llama-2-7b \(.*hidden_size=64"):
        create_lm("Llama-2-7b", pretrained=folder)
    with pytest.raises(ValueError, match="pretrained=FOLDER"):
        create_lm("llama")


# meta-llama/Llama-2-7b-hf's config.json (transformers 4.31), and Meta-Llama-3-8B's.
LLAMA_2_7B = dict(
    architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2, hidden_act="silu", hidden_size=4096,
    initializer_range=0.02, intermediate_size=11008, max_position_embeddings=4096, model_type="llama",
    num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32, pretraining_tp=1, rms_norm_eps=1e-05,
    rope_scaling=None, tie_word_embeddings=False, torch_dtype="float16", transformers_version="4.31.0.dev0",
    use_cache=True, vocab_size=32000,
)  # fmt: skip
LLAMA_3_8B = dict(
    LLAMA_2_7B, intermediate_size=14336, max_position_embeddings=8192, num_key_value_heads=8, rope_theta=500000.0,
    vocab_size=128256, torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001,
)  # fmt: skip


def test_released_configs_give_the_presets():
    assert preset_differences("Llama-2-7b", llama_config_to_kwargs(LLAMA_2_7B)) == []
    assert preset_differences("vicuna-7b-v1.5", llama_config_to_kwargs(dict(LLAMA_2_7B, pad_token_id=0))) == []
    assert preset_differences("Llama-3-8B", llama_config_to_kwargs(LLAMA_3_8B)) == []
    assert preset_differences("Llama-2-13b", llama_config_to_kwargs(
        dict(LLAMA_2_7B, hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
             num_hidden_layers=40))) == []  # fmt: skip
    # transformers 5's rope_parameters and 4.x's rope_scaling with the old "type" name read the same
    new = llama_config_to_kwargs(dict(BASE, rope_parameters=dict(LLAMA3_SCALING, rope_theta=500.0)))
    old = llama_config_to_kwargs(dict(BASE, rope_theta=500.0, rope_scaling={
        **{key: value for key, value in LLAMA3_SCALING.items() if key != "rope_type"}, "type": "llama3"}))
    assert new == old and new["rope_scaling"]["factor"] == 4.0 and new["rope_theta"] == 500.0


def test_llava_text_config_takes_llama_config_defaults():
    """llava-hf/llava-1.5-7b-hf's text_config names only what differs from LlamaConfig's defaults; absent fields
    take those defaults (a 7B LLaMA), which give vicuna-7b-v1.5 with LLaVA's 64 added token rows."""
    text_config = {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                   "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                   "torch_dtype": "float16", "vocab_size": 32064}
    assert preset_differences("vicuna-7b-v1.5", llama_config_to_kwargs(text_config)) == [
        "vocab_size=32064 (the preset's 32000)"]


@pytest.mark.parametrize("changes, named", [
    (dict(sliding_window=16), "sliding_window=16"),
    (dict(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope_type='dynamic'"),
    (dict(rope_scaling=dict(type="yarn", factor=2.0)), "rope_type='yarn'"),
    (dict(rope_scaling=dict(rope_type="linear", factor=2.0, attention_factor=1.0)), "attention_factor=1.0"),
    (dict(rope_scaling=dict(rope_type="linear")), "factor=None"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(head_dim=32), "head_dim=32"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(intermediate_size=0), "intermediate_size=0"),
    (dict(model_type="mistral"), "model_type='mistral'"),
])  # fmt: skip
def test_config_this_model_cannot_be_is_refused_in_one_line(changes, named):
    with pytest.raises(BadInput) as error:
        llama_config_to_kwargs({**LLAMA_2_7B, **changes}, "folder/config.json")
    message = str(error.value)
    assert named in message and message.startswith("folder/config.json") and "\n" not in message


def test_folder_problems_are_refused_in_one_line(tmp_path):
    folder = saved(hf_model(seed=13), tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads(open(os.path.join(folder, "model.safetensors.index.json")).read())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(folder, shard))
    with pytest.raises(FileNotFoundError) as error:
        load_llama(folder)
    assert shard in str(error.value) and "\n" not in str(error.value)

    folder = saved(hf_model(seed=14), tmp_path / "shapes")
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    config["intermediate_size"] = 128  # the weights have 96
    open(os.path.join(folder, "config.json"), "w").write(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load_llama(folder)
    message = str(error.value)
    assert "mlp.fc1.weight: checkpoint (192, 64) vs model (256, 64)" in message and "\n" not in message

    config["intermediate_size"], config["num_hidden_layers"] = 96, 1  # layer 1's weights are left over
    open(os.path.join(folder, "config.json"), "w").write(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected keys \(6\): transformer\.blocks\.1\."):
        load_llama(folder)
    with pytest.raises(FileNotFoundError, match="no LLaMA folder"):
        load_llama(tmp_path / "nothing")


TOKENIZER_TEXTS = ["The quick brown fox jumps over the lazy dog.", "A photo of 2 cats and 13 dogs on a red sofa!",
                   "USER: What is in the image? ASSISTANT: A small brown dog."]


def test_llama_tokenizer_ids_equal_sentencepiece_and_transformers(tmp_path):
    """A sentencepiece model trained as LLaMA's was (BPE with byte fallback, digits split, unk 0, bos 1, eos 2, no
    pad): our ids equal sentencepiece's and transformers' LlamaTokenizer's, case and unseen characters (bytes)
    included; SentencePieceTokenizer, which lowercases and needs pad 0, refuses it."""
    import sentencepiece as spm

    from crossmodal.data.tokenizer import LlamaTokenizer, SentencePieceTokenizer

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TOKENIZER_TEXTS * 20), model_prefix=str(folder / "tokenizer"), model_type="bpe",
        vocab_size=340, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=1.0, num_threads=1,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    path = folder / "tokenizer.model"
    ours, processor = LlamaTokenizer(path), spm.SentencePieceProcessor(model_file=str(path))
    reference = transformers.LlamaTokenizer.from_pretrained(folder)
    assert (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2, 0)
    sentences = ["The Quick brown fox.", "USER: a photo of 42 dogs ASSISTANT:", "Zürich 😀  two  spaces"]
    for sentence in sentences:
        ids = ours.encode(sentence)
        assert ids == processor.encode(sentence) == reference(sentence, add_special_tokens=False).input_ids
        assert ours.decode(ids) == sentence
    assert any(processor.id_to_piece(i).startswith("<0x") for i in ours.encode("😀"))  # byte fallback
    assert ours.encode("The") != ours.encode("the")  # case kept
    short, long = ours.encode("The fox."), ours.encode(sentences[1])
    assert len(short) + 2 < 16 < len(long) + 2
    rows = LlamaTokenizer(path, context_length=16)(["The fox.", sentences[1]])  # (2, 16)
    assert rows[0].tolist() == [1, *short, 2] + [0] * (14 - len(short))
    assert rows[1].tolist() == [1, *long[:14], 2]  # cut, eos kept
    with pytest.raises(ValueError, match="pad_id=0"):
        SentencePieceTokenizer(path)


def test_the_language_model_recipe_trains_and_evaluates_a_llama_preset(tmp_path):
    """train.py on the LM demo's config with model.name=llama-tiny, then eval.py's loader rebuilds it from the run;
    a LLaMA folder of another architecture is refused as model.pretrained before anything runs."""
    from crossmodal import train
    from crossmodal.recipes import load_run

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/lm/tiny_shapes.yaml")
    run = ["--config", config, "--model.name=llama-tiny", f"--out_dir={tmp_path / 'run'}", "--train.steps=3",
           "--train.warmup_steps=1", "--train.log_every=1", "--data.tokenizer_captions=300",
           "--data.val=shapes_icl:val:8"]
    results = train.main(run)
    assert "val/words_seen_accuracy" in results and results["step"] == 3
    cfg, model, tokenizer = load_run(str(tmp_path / "run" / "checkpoint.pt"))
    assert isinstance(model, LlamaLM) and model.token_embedding.num_embeddings == tokenizer.vocab_size
    folder = saved(hf_model(), tmp_path / "other")  # BASE's architecture, not llama-tiny's
    with pytest.raises(SystemExit, match=r"model\.pretrained: .*config\.json describes another architecture than "
                                         r"the preset llama-tiny"):
        train.main([*run, f"--model.pretrained={folder}", f"--out_dir={tmp_path / 'refused'}"])
