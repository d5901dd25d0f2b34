"""export.py (issue 29): exported models give our features in their peers, on random weights. open_clip loads the
file `create_model(NAME, pretrained=PATH)` (ViT-B-32 itself; tiny presets through the model config written beside
it), transformers' CLIPModel and BLIP load the folder (features, ITM scores and greedy captions, tokenizer ids),
onnxruntime runs the encoders at batch sizes 1 and 3; the safetensors writer against the package; the command's
outputs and one-line refusals."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from crossmodal import export
from crossmodal.config import Failure, load_config
from crossmodal.data.tokenizer import BertTokenizer, ClipTokenizer
from crossmodal.models import convert, create_model
from crossmodal.models.blip import BLIP_MODELS, build_blip

try:  # test-only peers (the dev extra)
    import open_clip
except ImportError:
    open_clip = None
try:
    import transformers
except ImportError:
    transformers = None
try:
    import onnxruntime
except ImportError:
    onnxruntime = None

needs_open_clip = pytest.mark.skipif(open_clip is None, reason="open_clip (the dev extra): the peer, with CLIP's BPE")
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers (the dev extra) is the peer")
needs_onnx = pytest.mark.skipif(onnxruntime is None or any(
    __import__("importlib").util.find_spec(name) is None for name in ("onnx", "onnxscript")),
    reason="onnx, onnxscript (the export extra) and onnxruntime (the dev extra)")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TEXTS = ["a photo of a cat", "Two dogs, playing in the SNOW!", "wow!! isn't it great? café naïve", "x " * 60]
ATOL = 1e-4  # the bar for exported features


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Init leaves biases at 0 and norms at identity; random values make every key count."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(1 + 0.5 * noise.abs())
            elif tensor.ndim <= 1 and "norm" in name and name.endswith("weight"):
                tensor.copy_(1 + 0.1 * noise)
            elif tensor.ndim <= 1:
                tensor.add_(0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def clip_tokenizer():
    if open_clip is None:
        pytest.skip("open_clip ships CLIP's BPE file")
    return ClipTokenizer(open_clip.tokenizer.default_bpe(), context_length=32)


def tiny_clip(name: str, tokenizer, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return randomize_(create_model(name, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
                                   **overrides))


def batches(tokenizer, image_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, tokens) at batch sizes 1 and 3."""
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, image_size, image_size, generator=generator), tokenizer(TEXTS[-size:]))
            for size in (1, 3)]


def assert_features(ours: nn.Module, image_features, text_features, tokenizer, image_size: int) -> float:
    """image_features(images), text_features(tokens) equal ours within ATOL at batch sizes 1 and 3; the largest
    difference."""
    largest = 0.0
    for images, tokens in batches(tokenizer, image_size):
        with torch.no_grad():
            pairs = [(image_features(images), ours.encode_image(images)),
                     (text_features(tokens), ours.encode_text(tokens))]
        for got, expected in pairs:
            assert got.shape == expected.shape
            torch.testing.assert_close(torch.as_tensor(got), expected, atol=ATOL, rtol=0)
            largest = max(largest, (torch.as_tensor(got) - expected).abs().max().item())
    return largest


# ---------------------------------------------------------------- safetensors


def test_safetensors_writer_is_read_by_the_package(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {
        "b": torch.randn(5).to(torch.bfloat16), "a": torch.randn(3, 4), "c": torch.arange(6).view(2, 3).T,
        "d": torch.tensor([True, False, True]), "e": torch.randn(2, 2).half(), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3), "i8": torch.tensor([-3, 7], dtype=torch.int8), "f64": torch.randn(3).double(),
    }  # fmt: skip
    with open(tmp_path / "x.safetensors", "wb") as file:
        convert.write_safetensors(file, tensors, {"format": "pt"})
    path = tmp_path / "x.safetensors"
    for read in (safetensors.load_file(path), convert.read_safetensors(path)):
        assert read.keys() == tensors.keys()
        for key, value in tensors.items():
            assert read[key].dtype == value.dtype and read[key].shape == value.shape, key
            assert torch.equal(read[key], value), key
    with open(tmp_path / "x.safetensors", "rb") as file:
        assert int.from_bytes(file.read(8), "little") % 8 == 0  # the package's alignment
    with pytest.importorskip("safetensors").safe_open(tmp_path / "x.safetensors", "pt") as file:
        assert file.metadata() == {"format": "pt"}


# ---------------------------------------------------------------- open_clip


@needs_open_clip
def test_open_clip_loads_vit_b_32_by_its_preset_name(tmp_path):
    """The issue's call, exactly: open_clip.create_model("ViT-B-32", pretrained=PATH), through the command with
    released weights (--model --pretrained)."""
    torch.manual_seed(0)
    ours = randomize_(create_model("ViT-B-32"))
    torch.save(convert.ours_to_openclip(ours.state_dict()), tmp_path / "released.pt")
    lines = export.main(["--model", "ViT-B-32", "--pretrained", str(tmp_path / "released.pt"), "--to", "open_clip",
                         "--out", str(tmp_path / "vit_b_32.pt")])
    assert "open_clip.create_model('ViT-B-32'" in lines[0] and not os.path.exists(tmp_path / "vit_b_32.json")
    peer = open_clip.create_model("ViT-B-32", pretrained=str(tmp_path / "vit_b_32.pt")).eval()
    tokenizer = ClipTokenizer(open_clip.tokenizer.default_bpe())
    print("ViT-B-32 largest difference", assert_features(ours, peer.encode_image, peer.encode_text, tokenizer, 224))


@needs_open_clip
@pytest.mark.parametrize("name, overrides", [("ViT-tiny", {"act_layer": "quick_gelu"}), ("RN-tiny", {}),
                                             ("ViT-tiny", {"init_logit_bias": -10.0})])
def test_open_clip_loads_tiny_models_through_the_config_beside(name, overrides, clip_tokenizer, tmp_path):
    ours = tiny_clip(name, clip_tokenizer, **overrides)
    out = str(tmp_path / "tiny_export.pt")
    lines = export.export_open_clip(name, ours, clip_tokenizer, out)
    assert "add_model_config" in lines[0]
    config = json.loads((tmp_path / "tiny_export.json").read_text())
    assert config["text_cfg"]["context_length"] == 32
    assert config.get("quick_gelu", False) == bool(overrides.get("act_layer"))
    open_clip.add_model_config(str(tmp_path / "tiny_export.json"))
    peer = open_clip.create_model("tiny_export", pretrained=out).eval()
    if "init_logit_bias" in overrides:
        assert peer.logit_bias.item() == pytest.approx(ours.logit_bias.item())
    assert_features(ours, peer.encode_image, peer.encode_text, clip_tokenizer, 64)


@needs_open_clip
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14-quickgelu", "RN50", "RN50x4-quickgelu"])
def test_open_clip_model_configs_equal_open_clips_own(name):
    """The config written beside a file, for a paper preset, is open_clip's model_configs/NAME.json (its
    dataclass defaults filled in): the generator says what open_clip would build."""
    with torch.device("meta"):
        ours = convert.openclip_model_config(create_model(name), eos_id=49407)
    theirs = open_clip.get_model_config(name)
    assert ours["embed_dim"] == theirs["embed_dim"] and ours.get("quick_gelu", False) == theirs.get("quick_gelu", False)
    for section, kind in (("vision_cfg", open_clip.model.CLIPVisionCfg), ("text_cfg", open_clip.model.CLIPTextCfg)):
        filled = dataclasses.asdict(kind(**theirs[section]))
        assert {key: filled[key] for key in ours[section]} == {key: ours[section][key] for key in ours[section]}


@needs_open_clip
def test_open_clip_pools_at_an_eos_that_is_not_the_largest_id(clip_tokenizer, tmp_path):
    """A sentencepiece run's end-of-text id (3) is not its largest: the config pools at it (pool_type eos)."""
    torch.manual_seed(0)
    ours = randomize_(create_model("ViT-tiny"))  # vocabulary 1024, context 32
    tokens = torch.zeros(2, 32, dtype=torch.long)
    tokens[0, :5], tokens[1, :9] = torch.tensor([2, 500, 900, 1000, 3]), torch.tensor([2, *range(1010, 1017), 3])
    tokenizer = type("SentencePieceLike", (), {"eos_id": 3})()
    export.export_open_clip("ViT-tiny", ours, tokenizer, str(tmp_path / "sp.pt"))
    text_cfg = json.loads((tmp_path / "sp.json").read_text())["text_cfg"]
    assert (text_cfg["pool_type"], text_cfg["eos_id"]) == ("eos", 3)
    open_clip.add_model_config(str(tmp_path / "sp.json"))
    peer = open_clip.create_model("sp", pretrained=str(tmp_path / "sp.pt")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peer.encode_text(tokens), ours.encode_text(tokens), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- HuggingFace CLIP


@needs_transformers
@pytest.mark.parametrize("act_layer", ["quick_gelu", "gelu"])
def test_hf_clip_features_and_tokenizer_equal_ours(act_layer, clip_tokenizer, tmp_path):
    ours = tiny_clip("ViT-tiny", clip_tokenizer, act_layer=act_layer)
    export.export_hf(ours, clip_tokenizer, str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "hf"))
    peer = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert peer.config.text_config.hidden_act == act_layer
    assert peer.logit_scale.item() == pytest.approx(ours.logit_scale.item())
    expected = transformers.CLIPModel(peer.config).state_dict()
    saved = convert.read_safetensors(tmp_path / "hf" / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}  # every key used

    def features(output):
        return getattr(output, "pooler_output", output)  # transformers 5 returns an output object

    largest = assert_features(ours, lambda images: features(peer.get_image_features(pixel_values=images)),
                              lambda tokens: features(peer.get_text_features(input_ids=tokens)), clip_tokenizer, 64)
    print(act_layer, "largest difference", largest)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tokenizer(TEXTS, truncation=True, max_length=clip_tokenizer.context_length)["input_ids"]
    for row, theirs in zip(clip_tokenizer(TEXTS).tolist(), ids):
        assert row[: row.index(clip_tokenizer.eos_id) + 1] == theirs  # HF pads with eos, ours with 0


@needs_transformers
def test_hf_clip_pools_at_a_sentencepiece_eos(tmp_path):
    """A tokenizer whose end-of-text id (3) is not its largest: config.json names it, and CLIPModel pools there."""
    torch.manual_seed(0)
    ours = randomize_(create_model("ViT-tiny"))  # vocabulary 1024, context 32
    tokenizer = type("SentencePieceLike", (), {"pad_id": 0, "bos_id": 2, "eos_id": 3})()
    lines = export.export_hf(ours, tokenizer, str(tmp_path / "hf"))
    assert "no tokenizer files" in lines[-1] and not os.path.exists(tmp_path / "hf" / "vocab.json")
    peer = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.zeros(2, 32, dtype=torch.long)
    tokens[0, :5], tokens[1, :9] = torch.tensor([2, 500, 900, 1000, 3]), torch.tensor([2, *range(1010, 1017), 3])
    with torch.no_grad():
        output = peer.get_text_features(input_ids=tokens)
        expected = ours.encode_text(tokens)
        torch.testing.assert_close(getattr(output, "pooler_output", output), expected, atol=ATOL, rtol=0)


def test_hf_refuses_a_resnet_clip(clip_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="CLIPModel has no ResNet image tower"):
        export.export_hf(create_model("RN-tiny"), clip_tokenizer, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf") and os.listdir(tmp_path) == []  # nothing half written


# ---------------------------------------------------------------- HuggingFace BLIP

SEP = 3  # [SEP] in the vocabulary below


def write_vocab(path) -> str:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "of", "dog", "cat", "on", "the", "grass"]
    words += [f"w{i}" for i in range(120)] + ["##s", "##ing"]
    path.write_text("\n".join(words) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    """A random BLIP-tiny (both text stacks, BERT tokenizer) exported --to hf, and the peer models loaded from it."""
    if transformers is None:
        pytest.skip("transformers (the dev extra) is the peer")
    folder = tmp_path_factory.mktemp("blip_export")
    tokenizer = BertTokenizer(write_vocab(folder / "vocab.txt"), context_length=12)
    torch.manual_seed(0)
    config = dataclasses.replace(BLIP_MODELS["BLIP-tiny"], image_size=32, tie_text_decoder=False, text_drop=0.0)
    model = randomize_(build_blip(config, tokenizer=tokenizer), seed=2)
    with torch.no_grad():  # larger weights than the init, so captions differ; [SEP] likely so that they end
        for name, tensor in model.state_dict().items():
            if tensor.ndim >= 2:
                tensor.mul_(3.0 if "embed" not in name else 10.0)
        model.lm_head.bias[SEP] += 3.0
    out = folder / "hf"
    export.export_hf(model, tokenizer, str(out))
    return dict(model=model, tokenizer=tokenizer, out=out,
                retriever=transformers.BlipForImageTextRetrieval.from_pretrained(out).eval(),
                captioner=transformers.BlipForConditionalGeneration.from_pretrained(out).eval(),
                images=torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("tied", [False, True])
def test_blip_key_map_round_trip(blip, tied):
    """ours -> HF -> ours (`blip_to_ours`, the loader's map) gives every tensor back; a decoder that shares all but
    self-attention with the encoder (BLIP's pretraining) is written out in full under both prefixes."""
    model = blip["model"] if not tied else randomize_(create_model("BLIP-tiny", tokenizer=blip["tokenizer"]))
    ours = model.state_dict()
    hf = convert.ours_to_blip_hf(ours)
    assert not any(key.startswith(("visual_encoder.", "lm_head.")) for key in hf)
    back = convert.blip_to_ours(hf)
    assert back.keys() == ours.keys() - {"temp"}
    assert all(torch.equal(back[key], ours[key]) for key in back)


def test_blip_itm_scores_equal_ours(blip):
    model, tokenizer, peer = blip["model"], blip["tokenizer"], blip["retriever"]
    tokens = tokenizer(["a dog on the grass", "a cat", "the dogs of w7 w8 w9 w10 w11 w12 w13"])
    enc_tokens = tokens.clone()
    enc_tokens[:, 0] = tokenizer.enc_id  # BLIP's ITM input; HF leaves it to the caller
    with torch.no_grad():
        itm = peer(input_ids=enc_tokens, pixel_values=blip["images"], attention_mask=(tokens != 0).long()).itm_score
        expected = model.itm_logits(blip["images"], tokens)
        torch.testing.assert_close(itm, expected, atol=ATOL, rtol=0)
        itc = peer(input_ids=tokens, pixel_values=blip["images"], attention_mask=(tokens != 0).long(),
                   use_itm_head=False).itm_score  # cosine similarities of the ITC features
        expected = model.encode_image(blip["images"]) @ model.encode_text(tokens).T
        torch.testing.assert_close(itc, expected, atol=ATOL, rtol=0)
    assert itm.softmax(-1)[:, 1].std() > 0.01  # the scores differ between pairs


def test_blip_greedy_captions_equal_ours(blip):
    model, tokenizer, peer = blip["model"], blip["tokenizer"], blip["captioner"]
    prompt = tokenizer.encode("a picture of")
    input_ids = torch.tensor([[tokenizer.cls_id, *prompt, SEP]] * 3)  # what HF's processor gives for the prompt
    with torch.no_grad():
        theirs = peer.generate(pixel_values=blip["images"], input_ids=input_ids, num_beams=1, max_length=16,
                               min_length=5)
    ours = model.generate_ids(blip["images"], [tokenizer.dec_id, *prompt], num_beams=1, max_length=16, min_length=5)

    def until_eos(row: list[int]) -> list[int]:
        generated = row[len(prompt) + 1 :]
        return row[: len(prompt) + 1] + (generated[: generated.index(SEP) + 1] if SEP in generated else generated)

    expected = [until_eos(row) for row in theirs.tolist()]
    assert [until_eos(row) for row in ours.tolist()] == expected
    assert len({tuple(row) for row in expected}) > 1, "every caption is the same: the test compares too little"
    assert any(len(row) < 16 for row in expected), "no caption ended early: the test does not exercise [SEP]"


def test_blip_tokenizer_and_config_load_back(blip):
    tokenizer, out = blip["tokenizer"], blip["out"]
    peer = transformers.BertTokenizer.from_pretrained(out)
    assert peer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [tokenizer.dec_id, tokenizer.enc_id]
    assert peer.bos_token == "[DEC]"
    texts = ["a dog on the grass", "Cats, dogs and w3!", "a picture of w100 w101"]
    assert peer(texts)["input_ids"] == [row[: row.index(SEP) + 1] for row in tokenizer(texts).tolist()]
    # our own loader reads the folder's config.json and weights back into the same model
    loaded = create_model("BLIP-tiny", pretrained=out).eval()
    tokens = tokenizer(texts)
    with torch.no_grad():
        expected = blip["model"].itm_logits(blip["images"], tokens)
        torch.testing.assert_close(loaded.itm_logits(blip["images"], tokens), expected)


def test_hf_refuses_a_resnet_blip(tmp_path):
    with pytest.raises(ValueError, match="ViT image tower only"):
        export.export_hf(create_model("BLIP-RN-tiny"), None, str(tmp_path / "hf"))


# ---------------------------------------------------------------- ONNX


@needs_onnx
@pytest.mark.parametrize("name, external", [("ViT-tiny", False), ("RN-tiny", True)])
def test_onnxruntime_features_equal_ours(name, external, clip_tokenizer, tmp_path, monkeypatch):
    """external: weights past ONNX_INLINE_LIMIT (here all) go to .data files beside the graphs."""
    ours = tiny_clip(name, clip_tokenizer)
    if external:
        monkeypatch.setattr(export, "ONNX_INLINE_LIMIT", 0)
    export.export_onnx(ours, clip_tokenizer, str(tmp_path / "onnx"))
    files = ["image_encoder.onnx", "text_encoder.onnx"]
    assert sorted(os.listdir(tmp_path / "onnx")) == sorted(files + [f"{file}.data" for file in files if external])
    image = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "image_encoder.onnx"))
    text = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "text_encoder.onnx"))
    assert [(i.name, i.type, i.shape[1:]) for i in image.get_inputs()] == [("images", "tensor(float)", [3, 64, 64])]
    assert [(i.name, i.type, i.shape[1:]) for i in text.get_inputs()] == [("tokens", "tensor(int64)", [32])]
    assert isinstance(image.get_inputs()[0].shape[0], str)  # the dynamic batch axis
    largest = assert_features(ours, lambda images: torch.from_numpy(image.run(None, {"images": images.numpy()})[0]),
                              lambda tokens: torch.from_numpy(text.run(None, {"tokens": tokens.numpy()})[0]),
                              clip_tokenizer, 64)
    print(name, "largest difference", largest)


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory, clip_tokenizer):
    """A ViT-tiny run with CLIP's BPE as train.py saves it (config, tokenizer bytes, model)."""
    folder = tmp_path_factory.mktemp("export_run")
    cfg = load_config(None, ["--model.name=ViT-tiny", "--data.tokenizer=clip", "--data.context_length=32",
                             f"--data.tokenizer_path={open_clip.tokenizer.default_bpe()}", "--data.image_size=64"])
    model = tiny_clip("ViT-tiny", clip_tokenizer)
    path = folder / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg),
                "tokenizer": clip_tokenizer.model_bytes(), "step": 0}, path)
    return str(path), model


def command(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "crossmodal.export", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@needs_transformers
def test_command_exports_a_run_and_refuses_in_one_line(run_checkpoint, clip_tokenizer, tmp_path):
    path, model = run_checkpoint
    result = command("--checkpoint", path, "--to", "hf", "--out", "hf", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "CLIPModel.from_pretrained" in result.stdout
    peer = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images, tokens = batches(clip_tokenizer, 64)[1]
    with torch.no_grad():
        output = peer.get_image_features(pixel_values=images)
        expected = model.encode_image(images)
        torch.testing.assert_close(getattr(output, "pooler_output", output), expected, atol=ATOL, rtol=0)
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no temporary folder left
    # an earlier export is not replaced without --force
    result = command("--checkpoint", path, "--to", "hf", "--out", "hf", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--force replaces it" in result.stderr
    assert "Traceback" not in result.stderr


def test_force_never_replaces_other_files(run_checkpoint, tmp_path):
    path, _ = run_checkpoint
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(Failure, match="notes.txt"):
        export.main(["--checkpoint", path, "--to", "onnx", "--out", str(tmp_path / "mine"), "--force"])
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]
    with pytest.raises(Failure, match="writes a file"):
        export.main(["--checkpoint", path, "--to", "open_clip", "--out", str(tmp_path / "mine"), "--force"])
    with pytest.raises(Failure, match="does not exist"):
        export.main(["--checkpoint", path, "--to", "hf", "--out", str(tmp_path / "no" / "hf")])


@needs_transformers
def test_a_finetuning_run_exports_its_clip(clip_tokenizer, tmp_path):
    """A fine-tuning run's checkpoint holds clip.* and head.*: the export is its CLIP, as eval.py evaluates it."""
    cfg = load_config(None, ["--model.name=ViT-tiny", "--data.tokenizer=clip", "--data.context_length=32",
                             f"--data.tokenizer_path={open_clip.tokenizer.default_bpe()}", "--data.image_size=64",
                             "--finetune.strategy=linear"])
    clip = tiny_clip("ViT-tiny", clip_tokenizer)
    weights = {f"clip.{key}": value for key, value in clip.state_dict().items()}
    weights.update({"head.weight": torch.randn(5, 128), "head.bias": torch.zeros(5)})
    torch.save({"model": weights, "config": dataclasses.asdict(cfg), "tokenizer": clip_tokenizer.model_bytes(),
                "step": 0}, tmp_path / "checkpoint.pt")
    export.main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--to", "hf", "--out", str(tmp_path / "hf")])
    peer = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images, tokens = batches(clip_tokenizer, 64)[1]
    with torch.no_grad():
        output = peer.get_text_features(input_ids=tokens)
        expected = clip.encode_text(tokens)
        torch.testing.assert_close(getattr(output, "pooler_output", output), expected, atol=ATOL, rtol=0)


def test_force_replaces_an_earlier_export(run_checkpoint, tmp_path):
    path, _ = run_checkpoint
    out = str(tmp_path / "hf")
    export.main(["--checkpoint", path, "--to", "hf", "--out", out])
    (tmp_path / "hf" / "config.json").write_text("{}")
    export.main(["--checkpoint", path, "--to", "hf", "--out", out, "--force"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "clip"
    assert sorted(os.listdir(tmp_path)) == ["hf"]


@pytest.mark.parametrize("args, message", [
    (["--model", "ViT-B-33", "--pretrained", "x.pt", "--to", "hf"], "unknown model 'ViT-B-33'"),
    (["--model", "RN-tiny", "--pretrained", "missing.pt", "--to", "hf"], "missing.pt"),
    (["--checkpoint", "missing.pt", "--to", "onnx"], "--checkpoint: no file at 'missing.pt'"),
])  # fmt: skip
def test_known_failures_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Failure) as failure:
        export.main([*args, "--out", "out"])
    assert failure.value.code == 2 and message in failure.value.message
    assert capsys.readouterr().err.count("\n") == 1


def test_blip_refusals_name_the_target(tmp_path):
    vocab = write_vocab(tmp_path / "vocab.txt")
    torch.save({"model": create_model("BLIP-tiny", tokenizer=BertTokenizer(vocab)).state_dict()}, tmp_path / "blip.pth")
    for target in ("open_clip", "onnx"):
        with pytest.raises(Failure, match=f"BLIP model: --to {target} exports CLIP models"):
            export.main(["--model", "BLIP-tiny", "--pretrained", str(tmp_path / "blip.pth"), "--vocab", vocab,
                         "--to", target, "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")
