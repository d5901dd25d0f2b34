"""BLIP (models/blip.py, models/text.py, models/generation.py, the BLIP key maps of models/convert.py): parity
with HuggingFace transformers' BLIP on random weights at BLIP-base size (features, ITM and decoder logits, greedy
and beam-search token ids), salesforce checkpoints, the post-norm block, the key/value cache, sampling and
partial checkpoints."""
import dataclasses
import json
import math
import os

import pytest
import torch
from torch import nn

from crossmodal.config import BadInput
from crossmodal.data.tokenizer import BertTokenizer
from crossmodal.models import convert, create_model, released_folder_problem
from crossmodal.models.blip import BLIP_MODELS, blip_config_from_hf, build_blip
from crossmodal.models.generation import beam_search, generate, nucleus_filter
from crossmodal.models.layers import Block, KVCache, Transformer
from crossmodal.kernels.linear import few_row_linear_available
from crossmodal.models.packed import linear_modules, onednn_available

transformers = pytest.importorskip("transformers")  # test-only reference

PROMPT = [104, 105, 106]  # "a picture of" in the test vocabulary
SEP, PAD, DEC, ENC = 102, 0, 30522, 30523


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_vocab(path: str) -> str:
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += ["a", "picture", "of", "dog", "cat"]
    words += [f"w{i}" for i in range(30522 - len(words))]
    with open(path, "w") as file:
        file.write("\n".join(words) + "\n")
    return path


def hf_config() -> "transformers.BlipConfig":
    text = dict(
        vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, layer_norm_eps=1e-12, bos_token_id=DEC, sep_token_id=SEP, pad_token_id=PAD,
    )  # fmt: skip
    vision = dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224,
        patch_size=16, layer_norm_eps=1e-6,
    )  # fmt: skip
    return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=256)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """HF's init leaves the ViT at ~0 (initializer_range 1e-10), biases at 0 and norms at identity; random values
    make every key count. [SEP] gets a larger output bias so that captions end at different lengths."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name.lower() and name.endswith("weight"):
                tensor.copy_(1 + 0.1 * noise)
            elif tensor.ndim == 1:
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(0.02 * noise if "embedding" not in name else 0.5 * noise)
        if hasattr(model, "text_decoder"):
            model.text_decoder.cls.predictions.bias[SEP] += 2.2
    return model.eval()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """HF captioner and retriever sharing one random ViT, saved as HF folders, and our model loaded from each."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("blip")
    captioner = randomize_(transformers.BlipForConditionalGeneration(hf_config()), seed=1)
    retriever = randomize_(transformers.BlipForImageTextRetrieval(hf_config()), seed=2)
    retriever.vision_model.load_state_dict(captioner.vision_model.state_dict())
    captioner.save_pretrained(folder / "captioner")
    retriever.save_pretrained(folder / "retriever")
    vocab = write_vocab(str(folder / "captioner" / "vocab.txt"))  # as in HF's released folders
    ours_captioner = create_model("BLIP-base", pretrained=folder / "captioner").eval()
    assert isinstance(ours_captioner.tokenizer, BertTokenizer)
    ours_retriever = create_model("BLIP-base", pretrained=folder / "retriever").eval()
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    tokens = torch.tensor([[101, 104, 105, 106, 107, 102, 0, 0], [101, 108, 2000, 3000, 4000, 5000, 6000, 102], [101, 104, 102, 0, 0, 0, 0, 0]])
    return dict(
        folder=folder, captioner=captioner, retriever=retriever, ours_captioner=ours_captioner,
        ours_retriever=ours_retriever, images=images, tokens=tokens, vocab=vocab,
    )  # fmt: skip


def assert_close(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> tuple[float, float]:
    difference = (got - expected).abs().max().item()
    relative = difference / expected.abs().max().item()
    assert relative < rtol, f"max abs diff {difference:.3g}, relative to the largest value {relative:.3g}"
    return difference, relative


@torch.no_grad()
def test_features_and_itm_equal_huggingface(reference):
    hf, ours, images, tokens = reference["retriever"], reference["ours_retriever"], reference["images"], reference["tokens"]
    mask = (tokens != PAD).long()
    image_tokens = hf.vision_model(pixel_values=images).last_hidden_state
    assert_close(ours.forward_image(images), image_tokens)
    image_features = nn.functional.normalize(hf.vision_proj(image_tokens[:, 0]), dim=-1)
    assert_close(ours.encode_image(images), image_features)
    text_states = hf.text_encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
    text_features = nn.functional.normalize(hf.text_proj(text_states[:, 0]), dim=-1)
    assert_close(ours.encode_text(tokens), text_features)
    enc_tokens = tokens.clone()
    enc_tokens[:, 0] = ENC  # BLIP's ITM input; HF leaves it to the caller
    itm = hf(input_ids=enc_tokens, pixel_values=images, attention_mask=mask).itm_score
    assert_close(ours.itm_logits(images, tokens), itm)
    assert ours.text_decoder is None and ours.lm_head is None  # a retrieval checkpoint has no decoder


@torch.no_grad()
def test_decoder_logits_equal_huggingface(reference):
    hf, ours, images, tokens = reference["captioner"], reference["ours_captioner"], reference["images"], reference["tokens"]
    dec_tokens = tokens.clone()
    dec_tokens[:, 0] = DEC
    expected = hf(pixel_values=images, input_ids=dec_tokens, attention_mask=(tokens != PAD).long()).logits
    got = ours.decoder_logits(tokens, ours.forward_image(images))
    real = tokens != PAD  # HF's padded positions see a different mask; their logits are never used
    assert_close(got[real], expected[real])
    assert ours.text_encoder is None  # a captioning checkpoint has no text encoder
    with pytest.raises(RuntimeError, match="text_encoder"):
        ours.encode_text(tokens)


def until_eos(row: list[int]) -> list[int]:
    """Ids up to and including the first [SEP] after the prompt (HF pads finished beams with [SEP], we with 0)."""
    generated = row[len(PROMPT) + 1 :]
    return row[: len(PROMPT) + 1] + (generated[: generated.index(SEP) + 1] if SEP in generated else generated)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_equals_huggingface(reference, num_beams):
    hf, ours, images = reference["captioner"], reference["ours_captioner"], reference["images"]
    input_ids = torch.tensor([[101, *PROMPT, SEP]] * len(images))  # what HF's processor gives for "a picture of "
    with torch.no_grad():
        expected = hf.generate(pixel_values=images, input_ids=input_ids, num_beams=num_beams, max_length=20, min_length=5)
    got = ours.generate_ids(images, [DEC, *PROMPT], num_beams=num_beams, max_length=20, min_length=5)
    expected_rows = [until_eos(row) for row in expected.tolist()]
    assert [until_eos(row) for row in got.tolist()] == expected_rows
    assert any(len(row) < 20 for row in expected_rows), "no caption ended early: the test does not exercise eos"
    hf_tokenizer = transformers.BertTokenizer(reference["vocab"])
    captions = ours.generate(images, prompt="a picture of ", num_beams=num_beams, max_length=20, min_length=5)
    assert captions == [hf_tokenizer.decode(row[len(PROMPT) + 1 :], skip_special_tokens=True) for row in expected_rows]


def test_nucleus_sampling_equals_huggingface(reference):
    hf, ours, images = reference["captioner"], reference["ours_captioner"], reference["images"]
    input_ids = torch.tensor([[101, *PROMPT, SEP]] * len(images))
    torch.manual_seed(5)
    with torch.no_grad():
        expected = hf.generate(pixel_values=images, input_ids=input_ids, do_sample=True, top_p=0.9, max_length=20, min_length=5, repetition_penalty=1.1)
    torch.manual_seed(5)  # both draw with torch.multinomial from the global generator
    got = ours.generate_ids(images, [DEC, *PROMPT], num_beams=1, max_length=20, min_length=5, top_p=0.9, top_k=50, repetition_penalty=1.1)
    assert got.tolist() == expected.tolist()


def salesforce_layout(state_dict: dict) -> dict:
    """HF keys renamed back per the reference note's section E.2 table, plus the training state a salesforce
    pretraining checkpoint also holds."""
    table = [
        ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
        ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
        ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
        ("vision_model.encoder.layers", "visual_encoder.blocks"),
        ("vision_model.post_layernorm", "visual_encoder.norm"),
        ("self_attn.projection", "attn.proj"), ("self_attn.qkv", "attn.qkv"),
        ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
    ]  # fmt: skip
    converted = {}
    for key, value in state_dict.items():
        for hf, salesforce in table:
            key = key.replace(hf, salesforce)
        converted[key] = value
    converted["text_encoder.embeddings.position_ids"] = torch.arange(512)[None]
    converted["visual_encoder_m.cls_token"] = torch.zeros(1, 1, 768)
    converted["image_queue"] = torch.zeros(256, 8)
    converted["temp"] = torch.tensor(0.05)
    return converted


def test_salesforce_checkpoint_loads(reference, tmp_path):
    state_dict = {**reference["retriever"].state_dict(), **reference["captioner"].state_dict()}
    path = tmp_path / "model_base.pth"
    torch.save({"model": salesforce_layout(state_dict), "epoch": 3}, path)
    model = create_model("BLIP-base", pretrained=path).eval()
    assert model.temp.item() == pytest.approx(0.05)
    images, tokens = reference["images"][:1], reference["tokens"][:1]
    with torch.no_grad():
        torch.testing.assert_close(model.itm_logits(images, tokens), reference["ours_retriever"].itm_logits(images, tokens), rtol=0, atol=0)
        image_tokens = model.forward_image(images)
        expected = reference["ours_captioner"].decoder_logits(tokens, image_tokens)
        torch.testing.assert_close(model.decoder_logits(tokens, image_tokens), expected, rtol=0, atol=0)
    # A larger image size interpolates the positions (384: BLIP's captioning and retrieval finetuning).
    model = create_model("BLIP-base", pretrained=path, image_size=256)
    assert model.visual_encoder.pos_embed.shape == (1, 1 + 16 * 16, 768)


def test_missing_decoder_fails_naming_it(reference):
    model = reference["ours_retriever"]
    model.tokenizer = BertTokenizer(reference["vocab"])
    with pytest.raises(RuntimeError, match="text_decoder"):
        model.generate(reference["images"][:1])


# ---------------------------------------------------------------- BLIP-tiny, layers and generation


TINY_EOS = 54  # a token the random tiny decoder below often picks: captions end at different lengths


def tiny_blip() -> nn.Module:
    torch.manual_seed(0)
    config = dataclasses.replace(BLIP_MODELS["BLIP-tiny"], vocab_size=64, dec_id=62, enc_id=63, eos_id=TINY_EOS)
    model = build_blip(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                tensor.copy_(1 + 0.1 * noise)
            elif tensor.ndim == 1:
                tensor.copy_(0.1 * noise)
            else:
                tensor.copy_(0.1 * noise if "embed" not in name else 0.5 * noise)
    return model


def tiny_images() -> torch.Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_post_norm_block_equals_bert_layer():
    torch.manual_seed(0)
    block = Block(32, 4, cross_attention=True, context_dim=16, post_norm=True).eval()
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 16)

    def bert_attention(h, keys_from, q_weight, q_bias, kv_weight, kv_bias, out):
        heads = lambda t: t.view(2, -1, 4, 8).transpose(1, 2)  # (B, heads, T, 8)
        q = heads(h @ q_weight.T + q_bias)
        k, v = (keys_from @ kv_weight.T + kv_bias).chunk(2, dim=-1)
        probs = (q @ heads(k).transpose(-1, -2) / math.sqrt(8)).softmax(-1)
        return out(( probs @ heads(v)).transpose(1, 2).reshape(2, -1, 32))

    qkv = block.attn.qkv
    h = block.norm1(x + bert_attention(x, x, qkv.weight[:32], qkv.bias[:32], qkv.weight[32:], qkv.bias[32:], block.attn.proj))
    cross = block.cross_attn
    h = block.norm_cross(h + bert_attention(h, context, cross.q.weight, cross.q.bias, cross.kv.weight, cross.kv.bias, cross.proj))
    h = block.norm2(h + block.mlp.fc2(nn.functional.gelu(block.mlp.fc1(h))))
    torch.testing.assert_close(block(x, context=context), h)


def test_kv_cache_equals_full_forward():
    torch.manual_seed(0)
    stack = Transformer(32, 2, 4, cross_attention=True, context_dim=16, post_norm=True).eval()
    x, context = torch.randn(2, 6, 32), torch.randn(2, 7, 16)
    full = stack(x, is_causal=True, context=context)
    cache = KVCache(2)
    steps = [stack(x[:, :3], is_causal=True, context=context, cache=cache)]  # a prompt, then one token at a time
    steps += [stack(x[:, t : t + 1], is_causal=True, context=context, cache=cache) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert cache.length == 6


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generation_equals_uncached(num_beams):
    model, images = tiny_blip(), tiny_images()
    options = dict(num_beams=num_beams, max_length=16, min_length=5)
    cached = model.generate_ids(images, [62, 5, 6], **options)
    assert torch.equal(cached, model.generate_ids(images, [62, 5, 6], use_cache=False, **options))
    assert (cached == TINY_EOS).any(), "no caption ended: the test does not exercise eos"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_on_packed_weights_equals_plain_linear(num_beams):
    model, images = tiny_blip(), tiny_images()
    options = dict(num_beams=num_beams, max_length=16, min_length=5)
    packed = model.generate_ids(images, [62, 5, 6], **options)  # on a CPU: the few-row kernel, oneDNN
    if onednn_available():  # the image tower's products have many rows: oneDNN on reordered weights
        tower = {id(module.weight) for module in linear_modules(model.visual_encoder)}
        assert tower <= set(model.linear_packing.copies)
    if few_row_linear_available():  # the decoding steps' (at most 12 rows): the few-row kernel, no copies
        steps = {id(block.mlp.fc1.weight) for block in model.text_decoder.transformer.blocks}
        assert not steps & set(model.linear_packing.copies)
    model.linear_packing = None
    assert torch.equal(packed, model.generate_ids(images, [62, 5, 6], **options))


def test_beam_one_equals_greedy():
    model, images = tiny_blip(), tiny_images()
    greedy = model.generate_ids(images, [62, 5, 6], num_beams=1, max_length=16, min_length=5)
    # HF's beam search normalises by length; without that (length_penalty 0) a single beam is greedy search.
    prompt = torch.tensor([[62, 5, 6]] * len(images))
    beam = beam_search(
        model.decode, prompt, model.forward_image(images), num_layers=3, eos_id=TINY_EOS, pad_id=0, max_length=16,
        min_length=5, num_beams=1, length_penalty=0.0,
    )  # fmt: skip
    assert beam.tolist() == greedy[:, : beam.shape[1]].tolist() and (greedy[:, beam.shape[1] :] == 0).all()


def test_nucleus_sampling_is_reproducible_and_stays_in_the_nucleus():
    scores = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    kept = nucleus_filter(scores, top_p=0.9, top_k=None).isfinite()
    assert kept.tolist() == [[False, True, True, True]]  # the smallest set reaching 0.9: 0.5 + 0.3 + 0.15
    assert nucleus_filter(scores, top_p=None, top_k=2).isfinite().tolist() == [[False, True, False, True]]

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    nucleus = set(nucleus_filter(logits[None], top_p=0.8, top_k=None).isfinite()[0].nonzero().flatten().tolist())
    assert 1 < len(nucleus) < 40

    def decode(tokens, context, cache):  # a fixed next-token distribution
        return logits.expand(tokens.shape[0], tokens.shape[1], -1)

    def sample(seed: int) -> torch.Tensor:
        prompt = torch.zeros(64, 1, dtype=torch.long)
        context = torch.zeros(64, 1, 1)
        return generate(decode, prompt, context, 1, eos_id=49, pad_id=48, max_length=12, top_p=0.8, generator=torch.Generator().manual_seed(seed))

    first = sample(7)
    assert torch.equal(first, sample(7)) and not torch.equal(first, sample(8))
    drawn = set(first[:, 1:].flatten().tolist()) - {48}
    assert drawn <= nucleus and len(drawn) > 1


def test_tied_decoder_round_trip(tmp_path):
    model = create_model("BLIP-tiny")
    assert model.text_decoder.embed is model.text_encoder.embed
    blocks = model.text_decoder.transformer.blocks[0], model.text_encoder.transformer.blocks[0]
    assert blocks[0].mlp is blocks[1].mlp and blocks[0].cross_attn is blocks[1].cross_attn and blocks[0].attn is not blocks[1].attn
    shared = sum(p.numel() for p in model.parameters())
    assert shared < sum(p.numel() for p in create_model("BLIP-tiny", tie_text_decoder=False).parameters())
    torch.save({"model": model.state_dict()}, tmp_path / "tiny.pth")
    loaded = create_model("BLIP-tiny", pretrained=tmp_path / "tiny.pth")
    assert loaded.text_decoder.embed is loaded.text_encoder.embed
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_safetensors_reader_equals_the_package(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {
        "a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
        "d": torch.tensor([True, False]), "e": torch.randn(2, 2).half(),
    }  # fmt: skip
    safetensors.save_file(tensors, tmp_path / "x.safetensors")
    read = convert.read_safetensors(tmp_path / "x.safetensors")
    assert read.keys() == tensors.keys()
    for key, value in tensors.items():
        assert read[key].dtype == value.dtype and torch.equal(read[key], value), key


def test_tiny_model_takes_a_tokenizer(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "dog"]) + "\n")
    tokenizer = BertTokenizer(tmp_path / "vocab.txt")
    model = create_model("BLIP-tiny", tokenizer=tokenizer).eval()
    assert model.text_encoder.embed.token_embedding.num_embeddings == tokenizer.vocab_size == 11
    assert (model.dec_id, model.enc_id, model.eos_id) == (9, 10, 3)
    captions = model.generate(torch.randn(2, 3, 64, 64), num_beams=2, max_length=10, min_length=5)
    assert len(captions) == 2 and all(isinstance(caption, str) for caption in captions)
    logits = model.decoder_logits(tokenizer(["a dog", "a picture of a dog"]), model.forward_image(torch.randn(2, 3, 64, 64)))
    assert logits.shape == (2, tokenizer.context_length, 11)


def test_parameter_counts_match_the_paper():
    """BLIP paper Table 3 (ViT-B/16): sharing all but self-attention 252M parameters, sharing nothing 361M."""
    with torch.device("meta"):
        counts = [sum(p.numel() for p in create_model("BLIP-base", tie_text_decoder=tie).parameters()) for tie in (True, False)]
    assert [round(count / 1e6) for count in counts] == [252, 361]


# ---------------------------------------------------------------- a folder's config.json


TINY_TEXT = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, intermediate_size=96,
    max_position_embeddings=32, bos_token_id=126, sep_token_id=SEP, pad_token_id=PAD,
)  # fmt: skip
TINY_VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80, image_size=32, patch_size=8)


def tiny_folder(folder, drop_text=(), **text) -> "transformers.BlipConfig":
    """Random HF captioner and retriever sharing their ViT, saved as `folder`/captioner and /retriever, whose text
    stacks have 8 heads (BlipConfig's default), 2 layers and an MLP of 1.5x; `drop_text`: text_config fields left
    out of config.json, as transformers 4.x's save_pretrained leaves out a default value."""
    config = transformers.BlipConfig(text_config={**TINY_TEXT, **text}, vision_config=TINY_VISION, image_text_hidden_size=24)
    captioner = randomize_(transformers.BlipForConditionalGeneration(config), seed=1)
    retriever = randomize_(transformers.BlipForImageTextRetrieval(config), seed=2)
    retriever.vision_model.load_state_dict(captioner.vision_model.state_dict())
    for name, model in (("captioner", captioner), ("retriever", retriever)):
        model.save_pretrained(folder / name)
        saved = json.loads((folder / name / "config.json").read_text())
        for key in drop_text:
            del saved["text_config"][key]
        (folder / name / "config.json").write_text(json.dumps(saved))
    return captioner, retriever


@torch.no_grad()
def test_folder_architecture_is_built_as_its_config_says(tmp_path):
    """BLIP-base named, a folder of another architecture given: the folder's is built, and every output equals
    transformers' (the 8 heads come from BlipConfig's default: config.json does not say them)."""
    captioner, retriever = tiny_folder(tmp_path, drop_text=("num_attention_heads",))
    assert "num_attention_heads" not in json.loads((tmp_path / "retriever" / "config.json").read_text())["text_config"]
    ours_retriever = create_model("BLIP-base", pretrained=tmp_path / "retriever").eval()
    ours_captioner = create_model("BLIP-base", pretrained=tmp_path / "captioner").eval()
    assert ours_retriever.text_encoder.transformer.blocks[0].attn.num_heads == 8
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokens = torch.tensor([[101, 10, 11, 12, SEP, PAD], [101, 13, 14, 15, 16, SEP]])
    mask = (tokens != 0).long()
    image_tokens = retriever.vision_model(pixel_values=images).last_hidden_state
    assert_close(ours_retriever.encode_image(images), nn.functional.normalize(retriever.vision_proj(image_tokens[:, 0]), dim=-1))
    text_states = retriever.text_encoder(input_ids=tokens, attention_mask=mask).last_hidden_state
    assert_close(ours_retriever.encode_text(tokens), nn.functional.normalize(retriever.text_proj(text_states[:, 0]), dim=-1))
    enc_tokens = torch.cat([torch.full_like(tokens[:, :1], ours_retriever.enc_id), tokens[:, 1:]], dim=1)
    itm = retriever(input_ids=enc_tokens, pixel_values=images, attention_mask=mask).itm_score
    assert_close(ours_retriever.itm_logits(images, tokens), itm)
    dec_tokens = torch.cat([torch.full_like(tokens[:, :1], 126), tokens[:, 1:]], dim=1)
    expected = captioner(pixel_values=images, input_ids=dec_tokens, attention_mask=mask).logits
    got = ours_captioner.decoder_logits(tokens, ours_captioner.forward_image(images))
    assert_close(got[tokens != 0], expected[tokens != 0])


@pytest.mark.parametrize("section, field, value", [
    ("text_config", "hidden_act", "relu"),  # an activation this model does not compute
    ("text_config", "position_embedding_type", "relative_key"),  # a field the loader does not know
    ("text_config", "is_decoder", False),  # no cross-attention
    ("vision_config", "num_channels", 1),
    ("text_config", "num_attention_heads", 7),  # not a divisor of the width
    ("vision_config", "pruned_heads", {"0": [1]}),
])  # fmt: skip
def test_folder_config_this_model_cannot_be_is_refused_naming_the_field(tmp_path, section, field, value):
    config = transformers.BlipConfig(text_config=TINY_TEXT, vision_config=TINY_VISION).to_dict()
    config[section][field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))  # no weights: refused before they are read
    with pytest.raises(BadInput, match=f"config.json {section}: .*{field}"):
        create_model("BLIP-base", pretrained=tmp_path)


def test_folder_config_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BadInput, match="config.json: not a readable JSON config"):
        create_model("BLIP-base", pretrained=tmp_path)
    config = transformers.BlipConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, tie_word_embeddings=False).to_dict()
    config["text_config"]["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="tie_word_embeddings=false"):
        create_model("BLIP-base", pretrained=tmp_path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]  # [SEP] is 3, the config's sep_token_id 2
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    text = {**TINY_TEXT, "vocab_size": 8, "bos_token_id": 6, "sep_token_id": 2}
    config = transformers.BlipConfig(text_config=text, vision_config=TINY_VISION).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match="sep_token_id=2, but the tokenizer's eos_id is 3"):
        create_model("BLIP-base", pretrained=tmp_path)


def test_training_from_a_folder_of_another_architecture_is_refused(tmp_path):
    """A run records only model.name and rebuilds the preset to resume: a folder it cannot rebuild is refused."""
    config = transformers.BlipConfig(text_config=TINY_TEXT, vision_config=TINY_VISION).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    problem = released_folder_problem("model.pretrained", tmp_path, "BLIP-tiny")
    assert "text_config.num_attention_heads=8 (the preset's 4)" in problem and "vision_config.hidden_size=48" in problem
    same = dataclasses.asdict(BLIP_MODELS["BLIP-tiny"])
    text = dict(hidden_size=same["text_width"], num_hidden_layers=same["text_layers"], num_attention_heads=same["text_heads"],
                intermediate_size=4 * same["text_width"], max_position_embeddings=same["context_length"])
    vision = dict(hidden_size=same["vision_width"], num_hidden_layers=same["vision_layers"], intermediate_size=4 * same["vision_width"],
                  num_attention_heads=same["vision_heads"], patch_size=same["patch_size"], layer_norm_eps=same["vision_eps"])
    config = transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=same["embed_dim"])
    (tmp_path / "config.json").write_text(config.to_json_string())
    assert released_folder_problem("model.pretrained", tmp_path, "BLIP-tiny") is None


def test_released_config_reads_every_field():
    """Salesforce/blip-image-captioning-base's config.json (transformers 4.26, every PretrainedConfig field written
    out): all of it read or ignored on purpose; what differs from BLIP-base is only what HF's port says otherwise
    (ViT LayerNorm eps 1e-5; BLIP's timm ViT has 1e-6) and the 384-pixel finetuning size."""
    common = {
        "_name_or_path": "", "add_cross_attention": False, "architectures": None, "bad_words_ids": None,
        "begin_suppress_tokens": None, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
        "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False,
        "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None, "finetuning_task": None,
        "forced_bos_token_id": None, "forced_eos_token_id": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
        "initializer_factor": 1.0, "initializer_range": 0.02, "is_encoder_decoder": False,
        "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20, "min_length": 0,
        "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
        "output_attentions": False, "output_hidden_states": False, "output_scores": False, "prefix": None,
        "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
        "return_dict": True, "return_dict_in_generate": False, "suppress_tokens": None, "task_specific_params": None,
        "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False, "tie_word_embeddings": True,
        "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torch_dtype": None, "torchscript": False,
        "transformers_version": "4.26.0.dev0", "typical_p": 1.0, "use_bfloat16": False,
    }  # fmt: skip
    text = {
        **common, "attention_probs_dropout_prob": 0.0, "bos_token_id": 30522, "eos_token_id": 2, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "hidden_size": 768, "intermediate_size": 3072, "is_decoder": True,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "blip_text_model",
        "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "projection_dim": 768,
        "sep_token_id": 102, "use_cache": True, "vocab_size": 30524,
    }  # fmt: skip
    vision = {
        **common, "attention_dropout": 0.0, "bos_token_id": None, "dropout": 0.0, "eos_token_id": None,
        "hidden_act": "gelu", "hidden_size": 768, "image_size": 384, "intermediate_size": 3072, "is_decoder": False,
        "layer_norm_eps": 1e-05, "model_type": "blip_vision_model", "num_attention_heads": 12, "num_channels": 3,
        "num_hidden_layers": 12, "pad_token_id": None, "patch_size": 16, "projection_dim": 512, "sep_token_id": None,
    }  # fmt: skip
    config = {
        "_commit_hash": None, "architectures": ["BlipForConditionalGeneration"], "image_text_hidden_size": 256,
        "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "blip", "projection_dim": 512,
        "text_config": text, "torch_dtype": "float32", "transformers_version": None, "vision_config": vision,
    }  # fmt: skip
    fields = blip_config_from_hf(config, "config.json")
    differences = {key for key, value in fields.items() if value != getattr(BLIP_MODELS["BLIP-base"], key)}
    assert differences == {"vision_eps", "image_size"}
