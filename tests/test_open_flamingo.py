"""Released OpenFlamingo weights through `create_model(name, pretrained=checkpoint.pt, vision=..., lm=...)` and
`eval.py --model ... --task fewshot_*`, on tiny random files laid out as the real ones are: an OpenFlamingo
checkpoint.pt written from OpenFlamingo's own modules (its resampler, gated blocks and resized token embedding), a
MosaicGPT folder like mpt-1b-redpajama-200b's (config.json, pytorch_model.bin, tokenizer.json) and an open_clip
CLIP checkpoint. The loaded model holds exactly those tensors and runs; missing or unfitting files are named; the
OpenFlamingo-3B preset has the trained parts' shapes of OpenFlamingo's factory (checked on the meta device: the
real 3B files are not available here)."""
import dataclasses
import json
import shutil

import pytest
import torch

from crossmodal import eval as eval_script
from crossmodal.models import MODELS, OPEN_FLAMINGO_TRAINED, Flamingo, build_model, convert, create_model
from crossmodal.models.flamingo import FLAMINGO_MODELS
from crossmodal.models.lm import LM_MODELS, DecoderLM
from tests.test_flamingo import open_flamingo_helpers, randomize_
from tests.test_gpt_neox_tokenizer import tokenizer_json  # noqa: F401 (a fixture: the tiny GPT-NeoX-like tokenizer)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NAME = "Flamingo-tiny"  # the preset's vision (a one-layer ViT-tiny) and resampler/cross-attention sizes
LM_WIDTH, LM_DEPTH, LM_VOCAB = 64, 2, 576  # MPT pads its vocabulary (50432 for 50277 ids): so does this one
VOCAB = 526  # the tokenizer's 500 + 23 space runs + OpenFlamingo's three


def mosaic_gpt_folder(folder, tokenizer_file) -> dict:
    """mpt-1b-redpajama-200b's layout: MosaicGPT config and keys (QK LayerNorm, no biases), random weights."""
    config = {
        "model_type": "mosaic_gpt", "d_model": LM_WIDTH, "n_heads": 4, "n_layers": LM_DEPTH, "mlp_ratio": 4,
        "max_seq_len": 256, "vocab_size": LM_VOCAB, "alibi": True, "alibi_bias_max": 8, "attn_qk_ln": True,
        "attn_clip_qkv": None, "softmax_scale": None, "logit_scale": None, "no_bias": True, "prefix_lm": False,
    }  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    shapes = {"transformer.wte.weight": (LM_VOCAB, LM_WIDTH), "transformer.ln_f.weight": (LM_WIDTH,)}
    for layer in range(LM_DEPTH):
        prefix = f"transformer.blocks.{layer}."
        shapes.update({
            prefix + "ln_1.weight": (LM_WIDTH,), prefix + "attn.Wqkv.weight": (3 * LM_WIDTH, LM_WIDTH),
            prefix + "attn.q_ln.weight": (LM_WIDTH,), prefix + "attn.k_ln.weight": (LM_WIDTH,),
            prefix + "attn.out_proj.weight": (LM_WIDTH, LM_WIDTH), prefix + "ln_2.weight": (LM_WIDTH,),
            prefix + "mlp.mlp_up.weight": (4 * LM_WIDTH, LM_WIDTH),
            prefix + "mlp.mlp_down.weight": (LM_WIDTH, 4 * LM_WIDTH),
        })  # fmt: skip
    weights = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    weights = {name: 1 + 0.1 * value if value.ndim == 1 else 0.2 * value for name, value in weights.items()}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(weights, folder / "pytorch_model.bin")
    shutil.copy(tokenizer_file, folder / "tokenizer.json")
    return weights


def open_flamingo_checkpoint(vision_width: int, list_copies: bool) -> tuple[dict, dict]:
    """(checkpoint.pt's state dict in OpenFlamingo's layout, the OpenFlamingo modules it came from), for the
    Flamingo-tiny preset on the tiny LM. `list_copies`: the gated blocks under `lang_encoder.gated_cross_attn_layers.N`
    instead of the FlamingoLayer wrappers' `lang_encoder.transformer.blocks.N.gated_cross_attn_layer`."""
    helpers = open_flamingo_helpers()
    preset = FLAMINGO_MODELS[NAME]
    torch.manual_seed(2)
    resampler = randomize_(helpers.PerceiverResampler(
        dim=vision_width, depth=preset["perceiver_depth"], dim_head=preset["perceiver_dim_head"],
        heads=preset["perceiver_heads"], num_latents=preset["num_latents"]), seed=3)
    blocks = [randomize_(helpers.GatedCrossAttentionBlock(
        dim=LM_WIDTH, dim_visual=vision_width, dim_head=preset["dim_head"], heads=preset["heads"],
        ff_mult=preset["ff_mult"]), seed=4 + layer) for layer in range(LM_DEPTH)]
    checkpoint = {f"perceiver.{key}": value for key, value in resampler.state_dict().items()}
    for layer, block in enumerate(blocks):
        prefix = (f"lang_encoder.gated_cross_attn_layers.{layer}." if list_copies
                  else f"lang_encoder.transformer.blocks.{layer}.gated_cross_attn_layer.")
        checkpoint.update({prefix + key: value for key, value in block.state_dict().items()})
    checkpoint["lang_encoder.transformer.wte.weight"] = torch.randn(VOCAB, LM_WIDTH)  # resized to len(tokenizer)
    return checkpoint, {"perceiver": resampler, "blocks": blocks}


@pytest.fixture(scope="module")
def released(tmp_path_factory, tokenizer_json):  # noqa: F811
    """The three files (and the sources they were written from)."""
    folder = tmp_path_factory.mktemp("released")
    vision_config = dataclasses.replace(MODELS["ViT-tiny"], vision_layers=1)
    torch.manual_seed(0)
    clip = build_model(vision_config)
    with torch.no_grad():
        for parameter in clip.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # norms and biases off their initial values too
    torch.save(convert.ours_to_openclip(clip.state_dict()), folder / "clip.pt")
    lm_weights = mosaic_gpt_folder(folder / "mpt", tokenizer_json)
    checkpoints = {}
    for layout in ("wrappers", "list"):
        checkpoint, modules = open_flamingo_checkpoint(vision_config.vision_width, list_copies=layout == "list")
        torch.save(checkpoint, folder / f"checkpoint_{layout}.pt")
        checkpoints[layout] = (checkpoint, modules)
    return {"folder": folder, "clip": clip, "lm": lm_weights, "checkpoints": checkpoints,
            "paths": dict(vision=str(folder / "clip.pt"), lm=str(folder / "mpt"))}


def load(released, layout="wrappers", **overrides):
    paths = {**released["paths"], **overrides}
    return create_model(NAME, pretrained=str(released["folder"] / f"checkpoint_{layout}.pt"), **paths)


@pytest.mark.parametrize("layout", ["wrappers", "list"])
def test_every_part_comes_from_its_file(released, layout):
    model = load(released, layout)
    assert isinstance(model, Flamingo) and not model.training
    assert all(not tensor.is_meta and tensor.dtype == torch.float32 for tensor in model.state_dict().values())
    ours = model.state_dict()
    # the trained parts: OpenFlamingo's modules' tensors, through the key map
    checkpoint, modules = released["checkpoints"][layout]
    trained = convert.open_flamingo_to_ours(checkpoint)
    assert set(trained) == {key for key in ours if key.startswith(OPEN_FLAMINGO_TRAINED)}
    assert all(torch.equal(ours[key], value) for key, value in trained.items())
    assert torch.equal(model.perceiver.blocks[1].attn.kv.weight, modules["perceiver"].layers[1][0].to_kv.weight)
    assert torch.equal(model.gated_cross_attn_layers[1].attn_gate, modules["blocks"][1].attn_gate)
    # the vision tower: the CLIP file's
    expected = released["clip"].visual.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.vision_encoder.state_dict().items())
    # the LM: the MPT folder's blocks and norm, the checkpoint's resized (tied) token embedding
    lm = convert.mpt_to_ours(released["lm"])
    assert all(torch.equal(model.lang_model.state_dict()[key], value) for key, value in lm.items()
               if key != "token_embedding.weight")
    assert model.lang_model.token_embedding.num_embeddings == VOCAB != LM_VOCAB
    assert (model.eoc_token_id, model.media_token_id, model.pad_token_id) == (523, 524, 525)


def test_the_loaded_model_runs(released, tokenizer_json):  # noqa: F811
    from crossmodal.data.tokenizer import GPTNeoXTokenizer

    model, tokenizer = load(released), GPTNeoXTokenizer(tokenizer_json)
    prompt = "<image>Output:a red circle<|endofchunk|>\n<image>Output:"
    tokens = torch.tensor([tokenizer.encode(prompt)])
    images = torch.randn(1, 2, 3, 64, 64)
    with torch.no_grad():
        logits = model.logits(tokens, model.encode_media(images))
    assert logits.shape == (1, tokens.shape[1], VOCAB) and logits.isfinite().all()
    new = model.generate(images, tokens, max_new_tokens=5, num_beams=2)
    assert new.shape[0] == 1 and 1 <= new.shape[1] <= 5


def test_missing_files_are_named(released, tmp_path):
    checkpoint = str(released["folder"] / "checkpoint_wrappers.pt")
    with pytest.raises(FileNotFoundError, match="pretrained .OpenFlamingo's checkpoint.pt.: no file at"):
        create_model(NAME, pretrained=str(tmp_path / "checkpoint.pt"), **released["paths"])
    with pytest.raises(FileNotFoundError, match="vision .*ViT-L-14.pt.: no file at '.*nothing.pt'"):
        create_model(NAME, pretrained=checkpoint, vision=str(tmp_path / "nothing.pt"), lm=released["paths"]["lm"])
    with pytest.raises(ValueError, match="no lm .the language model's HuggingFace folder"):
        create_model(NAME, pretrained=checkpoint, vision=released["paths"]["vision"])
    shutil.copytree(released["paths"]["lm"], tmp_path / "mpt")
    (tmp_path / "mpt" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="lm/tokenizer.json: no file at"):
        create_model(NAME, pretrained=checkpoint, vision=released["paths"]["vision"], lm=str(tmp_path / "mpt"))
    with pytest.raises(ValueError, match="pass pretrained=checkpoint.pt, vision= and lm=.*create_flamingo"):
        create_model(NAME)
    with pytest.raises(ValueError, match="unknown create_model override 'image_size'"):
        create_model(NAME, pretrained=checkpoint, image_size=32, **released["paths"])


def test_files_that_do_not_fit_are_named(released, tmp_path):
    # a CLIP checkpoint given as the OpenFlamingo one: every trained key is missing
    with pytest.raises(ValueError, match=r"does not fit model 'Flamingo-tiny'.*\nmissing keys .*perceiver.latents"):
        create_model(NAME, pretrained=released["paths"]["vision"], **released["paths"])
    # a tokenizer with more ids than the checkpoint's embedding rows
    checkpoint, _ = released["checkpoints"]["wrappers"]
    torch.save({**checkpoint, "lang_encoder.transformer.wte.weight": torch.randn(VOCAB - 1, LM_WIDTH)},
               tmp_path / "short.pt")
    with pytest.raises(ValueError, match="525 rows and the tokenizer 526 ids"):
        create_model(NAME, pretrained=str(tmp_path / "short.pt"), **released["paths"])
    # OpenFlamingo's own training checkpoints nest the state dict, with DDP's prefix
    nested = {"epoch": 0, "model_state_dict": {f"module.{key}": value for key, value in checkpoint.items()}}
    torch.save(nested, tmp_path / "checkpoint_0.pt")
    model = create_model(NAME, pretrained=str(tmp_path / "checkpoint_0.pt"), **released["paths"])
    assert torch.equal(model.perceiver.latents, checkpoint["perceiver.latents"])


def test_open_flamingo_3b_preset_fits_the_factory_shapes():
    """OpenFlamingo's factory for OF-3B on the meta device (`PerceiverResampler(dim=1024)`, a
    `GatedCrossAttentionBlock(dim=2048, dim_visual=1024)` before each of MPT-1B's 24 layers, the embedding resized
    to 50280 rows) against our preset: the same trained keys and shapes, so the real checkpoint.pt loads."""
    helpers = open_flamingo_helpers()
    name = "OpenFlamingo-3B-vitl-mpt1b"
    preset = FLAMINGO_MODELS[name]
    with torch.device("meta"):
        resampler = helpers.PerceiverResampler(dim=1024)
        block = helpers.GatedCrossAttentionBlock(dim=2048, dim_visual=1024)
        theirs = {f"perceiver.{key}": value for key, value in resampler.state_dict().items()}
        for layer in range(24):
            prefix = f"lang_encoder.transformer.blocks.{layer}.gated_cross_attn_layer."
            theirs.update({prefix + key: value for key, value in block.state_dict().items()})
        theirs["lang_encoder.transformer.wte.weight"] = torch.empty(50280, 2048)
        vision = build_model(MODELS[preset["vision"]]).visual
        lm = DecoderLM(**{**LM_MODELS[preset["lm"]], "vocab_size": 50280})
        ours = Flamingo(vision, lm, media_token_id=50278, eoc_token_id=50277, pad_token_id=50279,
                        **{key: value for key, value in preset.items() if key not in ("vision", "lm")})
    expected = {key: value for key, value in ours.state_dict().items() if key.startswith(OPEN_FLAMINGO_TRAINED)}
    assert convert.describe_mismatch(expected, convert.open_flamingo_to_ours(theirs)) == ""
    assert ours.vision_final_norm is False and vision.image_size == 224 and lm.context_length == 2048


def test_vision_final_norm_off_feeds_the_tokens_before_the_norm(released):
    model = load(released)
    images = torch.randn(2, 1, 3, 64, 64)
    with torch.no_grad():
        tokens = model.vision_encoder.forward_features(images.flatten(0, 1), final_norm=False)
        assert torch.allclose(model.vision_encoder.norm(tokens), model.vision_encoder.forward_features(images[:, 0]))
        model.vision_final_norm = False
        expected = model.perceiver(tokens[:, None, None, 1:])
        torch.testing.assert_close(model.encode_media(images), expected)


def test_eval_fewshot_caption_on_released_files(released, tmp_path):
    out = tmp_path / "fewshot.json"
    results = eval_script.main([
        "--model", NAME, "--pretrained", str(released["folder"] / "checkpoint_wrappers.pt"),
        "--vision", released["paths"]["vision"], "--lm", released["paths"]["lm"], "--task", "fewshot_caption",
        "--data", "shapes:val:8", "--shots", "0", "2", "--seeds", "2", "--num-queries", "4", "--batch-size", "4",
        "--out", str(out),
    ])  # fmt: skip
    written = json.loads(out.read_text())
    assert written["model"] == NAME and written["prompts"] == "open_flamingo" and written["metric"] == "CIDEr"
    assert set(written["shots"]) == {"0", "2"} == set(results["shots"])
    for value in written["shots"].values():
        assert {"mean", "std"} <= set(value) and len(value["runs"]) == 2 and value["mean"] >= 0
    with pytest.raises(SystemExit, match="needs --lm .* and --vision"):
        eval_script.main(["--model", NAME, "--pretrained", "x.pt", "--task", "fewshot_caption",
                          "--data", "shapes:val:8"])
