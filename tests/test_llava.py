"""LLaVA (models/llava.py) and HuggingFace CLIP vision weights (models/convert.py's CLIP vision and LLaVA key maps,
`VisionTransformer.hidden_states`): against transformers' CLIPVisionModel and LlavaForConditionalGeneration on random
tiny configs saved as HF folders. The tower's hidden states, last_hidden_state and pooler_output; LLaVA's logits in
the three key layouts (transformers 5's save_pretrained, its module tree, the released 4.x files with their sparse
config.json), vision_feature_layer and select strategy, projector activation, tied embeddings, greedy, left-padded
and beam generation equal to HF's generate; presets through create_model; one-line refusals."""
import json
import os
from typing import Optional

import pytest
import torch

from crossmodal.config import BadInput
from crossmodal.models import convert, create_model
from crossmodal.models.llava import (
    LLAVA_MODELS, LLaVA, build_llava, llava_config_to_kwargs, load_clip_vision, load_llava, preset_differences,
)

transformers = pytest.importorskip("transformers")  # test-only reference

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

VOCAB, BOS, EOS, PAD, IMAGE = 101, 1, 2, 0, 100
IMAGE_SIZE, PATCH = 16, 4  # 16 patches
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE_SIZE,
              patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16)
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=BOS,
            eos_token_id=EOS, pad_token_id=PAD)
TOLERANCE = dict(atol=1e-4, rtol=0)


def hf_llava(seed: int = 0, text: Optional[dict] = None, **kwargs):
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION),
        text_config=transformers.LlamaConfig(**{**TEXT, **(text or {})}), image_token_index=IMAGE, **kwargs,
    )  # fmt: skip
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms start at weight 1, bias 0: perturb every weight, so that a misplaced key shows
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def save(model, folder) -> str:
    model.save_pretrained(folder)
    return str(folder)


def rewrite(folder, target, rename, config_change=None) -> str:
    """A copy of an HF folder with every key renamed (and its config.json changed), as another transformers
    version would have written it."""
    os.makedirs(target, exist_ok=True)
    tensors = convert.read_hf_weights(folder)
    with open(os.path.join(target, "model.safetensors"), "wb") as file:
        convert.write_safetensors(file, {rename(key): value for key, value in tensors.items()})
    with open(os.path.join(folder, "config.json")) as file:
        config = json.load(file)
    with open(os.path.join(target, "config.json"), "w") as file:
        json.dump(config_change(config) if config_change else config, file)
    return str(target)


def module_tree_key(key: str) -> str:
    """transformers 5's save layout -> its module tree (what >= 4.52 saved): model.language_model (a LlamaModel),
    model.vision_tower, model.multi_modal_projector, lm_head."""
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if key.startswith(old):
            return new + key[len(old):]
    raise AssertionError(key)


def released_key(key: str) -> str:
    """transformers 5's save layout -> llava-hf's released 4.x files: the tower under vision_tower.vision_model."""
    return "vision_tower.vision_model." + key[len("vision_tower."):] if key.startswith("vision_tower.") else key


def released_config(config: dict) -> dict:
    """A 5.x LLaVA config.json as llava-hf/llava-1.5-7b-hf's (transformers 4.36): top-level ignore_index,
    pad_token_id and vocab_size; no image_seq_length or multimodal_projector_bias; sub-configs that state only what
    differs from their defaults, with torch_dtype and 4.x's rope_theta instead of rope_parameters."""
    text = {key: config["text_config"][key] for key in TEXT}
    text.update(model_type="llama", architectures=["LlamaForCausalLM"], torch_dtype="float16", rope_theta=10000.0,
                _name_or_path="lmsys/vicuna-7b-v1.5")
    vision = {key: config["vision_config"][key] for key in VISION if key != "layer_norm_eps"}
    vision.update(model_type="clip_vision_model", vocab_size=32000)
    return {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": IMAGE,
        "model_type": "llava", "pad_token_id": PAD, "projector_hidden_act": "gelu", "text_config": text,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": vision, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vocab_size": VOCAB,
    }  # fmt: skip


def prompts(batch: int, length: int, images_per_prompt: int = 1, features: int = 16, seed: int = 1) -> torch.Tensor:
    """(batch, length) ids: text, then the image tokens of each image (one run per image), then text."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE, (batch, length), generator=generator)
    for row in range(batch):
        start = 1 + row
        for _ in range(images_per_prompt):
            ids[row, start : start + features] = IMAGE
            start += features + 2
    return ids


def pixels(count: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the CLIP vision tower


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_vision_hidden_states_equal_transformers(tmp_path, act):
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**VISION, "hidden_act": act,
                                                                       "layer_norm_eps": 1e-6})).eval()
    folders = [save(hf, tmp_path / "5x"),  # no vision_model. prefix; 4.x wrote it, with a position_ids buffer
               rewrite(tmp_path / "5x", tmp_path / "4x", lambda key: "vision_model." + key)]
    tensors = convert.read_hf_weights(folders[1])
    tensors["vision_model.embeddings.position_ids"] = torch.arange(1 + 16)[None]
    with open(os.path.join(folders[1], "model.safetensors"), "wb") as file:
        convert.write_safetensors(file, tensors)
    images = pixels(3)
    with torch.no_grad():
        expected = hf(images, output_hidden_states=True)
    assert len(expected.hidden_states) == 4
    for folder in folders:
        tower = load_clip_vision(folder)
        assert tower.norm.eps == 1e-6
        with torch.no_grad():
            for k in (-1, -2, 1, 0, -4):
                torch.testing.assert_close(tower.hidden_states(images, [k])[0], expected.hidden_states[k], **TOLERANCE)
            torch.testing.assert_close(tower.forward_features(images, final_norm=False), expected.last_hidden_state,
                                       **TOLERANCE)
            torch.testing.assert_close(tower.forward_features(images)[:, 0], expected.pooler_output, **TOLERANCE)


def test_hidden_states_run_no_block_past_the_deepest(tmp_path):
    torch.manual_seed(0)
    tower = load_clip_vision(save(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), tmp_path))
    calls = []
    for index, block in enumerate(tower.transformer.blocks):
        block.register_forward_hook(lambda module, args, output, index=index: calls.append(index))
    tower.hidden_states(pixels(1), [-2])
    assert calls == [0, 1]  # blocks 1 and 2 of 3; the last one does not run
    with pytest.raises(ValueError, match="hidden state 4 of a 3-block ViT"):
        tower.hidden_states(pixels(1), [4])


def test_clip_vision_refusals(tmp_path):
    torch.manual_seed(0)
    folder = save(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), tmp_path / "clip")
    config = json.load(open(os.path.join(folder, "config.json")))
    for change, match in (({"hidden_act": "relu"}, "hidden_act='relu'"), ({"use_swiglu": True}, "use_swiglu=True"),
                          ({"model_type": "siglip_vision_model"}, "model_type='siglip_vision_model'")):
        with open(os.path.join(folder, "config.json"), "w") as file:
            json.dump({**config, **change}, file)
        with pytest.raises(BadInput, match=match) as error:
            load_clip_vision(folder)
        assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="no CLIPVisionModel folder"):
        load_clip_vision(tmp_path / "nothing")


# ---------------------------------------------------------------- LLaVA against transformers


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny LLaVA in HF and its folder as transformers 5.25 saves it."""
    hf = hf_llava()
    return hf, save(hf, tmp_path_factory.mktemp("llava"))


LAYOUTS = {  # name -> (key rename, config.json change) from transformers 5's save layout
    "saved-5x": None,
    "module-tree": (module_tree_key, None),
    "released-4x": (released_key, released_config),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def folder(request, reference, tmp_path_factory):
    _, saved = reference
    if LAYOUTS[request.param] is None:
        return saved
    return rewrite(saved, tmp_path_factory.mktemp(request.param), *LAYOUTS[request.param])


def test_layouts_hold_their_keys(reference, folder):
    keys = set(convert.read_hf_weights(folder))
    name = os.path.basename(folder.rstrip("/"))
    if name.startswith("llava"):  # transformers 5.25's save_pretrained writes 4.x's prefixes, the tower without its own
        assert "language_model.model.embed_tokens.weight" in keys and "vision_tower.pre_layrnorm.weight" in keys
    elif name.startswith("module-tree"):
        assert "lm_head.weight" in keys and "model.language_model.embed_tokens.weight" in keys
        assert "model.vision_tower.pre_layrnorm.weight" in keys
    elif name.startswith("released-4x"):
        assert "language_model.lm_head.weight" in keys and "vision_tower.vision_model.pre_layrnorm.weight" in keys


def test_logits_equal_transformers_in_every_layout(reference, folder):
    hf, _ = reference
    model = create_model("llava", pretrained=folder)
    assert isinstance(model, LLaVA) and model.language_model.lm_head is not None
    images, input_ids = pixels(2), prompts(2, 24)
    with torch.no_grad():
        expected = hf(pixel_values=images, input_ids=input_ids).logits
        torch.testing.assert_close(model(images, input_ids), expected, **TOLERANCE)


def test_two_images_in_one_prompt_and_a_prompt_without(reference):
    hf, folder = reference
    model = load_llava(folder)
    input_ids = torch.cat([prompts(1, 40, images_per_prompt=2), torch.randint(3, IMAGE, (1, 40))])  # 2 images, 0
    images = pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(model(images, input_ids), hf(pixel_values=images, input_ids=input_ids).logits,
                                   **TOLERANCE)
        text_only = input_ids[1:]
        torch.testing.assert_close(model(None, text_only), model.language_model(text_only), atol=0, rtol=0)


@pytest.mark.parametrize("layer, strategy, act", [(-1, "full", "gelu"), (-2, "full", "quick_gelu"),
                                                  (1, "default", "gelu_pytorch_tanh"), ([0, -2], "default", "gelu")])
def test_feature_layer_strategy_and_projector_act(tmp_path, layer, strategy, act):
    hf = hf_llava(seed=3, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                  projector_hidden_act=act)
    model = load_llava(save(hf, tmp_path))
    features = 16 + (strategy == "full")
    assert model.features_per_image == features
    images, input_ids = pixels(2), prompts(2, 30, features=features)
    with torch.no_grad():
        torch.testing.assert_close(model(images, input_ids), hf(pixel_values=images, input_ids=input_ids).logits,
                                   **TOLERANCE)


def test_tied_embeddings_and_no_projector_bias(tmp_path):
    hf = hf_llava(seed=4, text=dict(tie_word_embeddings=True), multimodal_projector_bias=False)
    model = load_llava(save(hf, tmp_path))
    assert model.language_model.lm_head is None and model.multi_modal_projector.linear_1.bias is None
    images, input_ids = pixels(1), prompts(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(images, input_ids), hf(pixel_values=images, input_ids=input_ids).logits,
                                   **TOLERANCE)


def test_linear_projector_dtype_and_an_image_id_outside_the_vocabulary(reference):
    _, folder = reference
    model = load_llava(folder, dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    model = load_llava(folder)
    images, input_ids = pixels(2), prompts(2, 24)
    outside = LLaVA(model.vision_tower, model.language_model, VOCAB + 7, projector="linear")  # LLaVA-1
    assert isinstance(outside.multi_modal_projector.linear_2, torch.nn.Identity)
    assert not any(key.startswith("multi_modal_projector.linear_2") for key in outside.state_dict())
    with torch.no_grad():
        outside.multi_modal_projector.linear_1.load_state_dict(model.multi_modal_projector.linear_1.state_dict())
        features = outside.multi_modal_projector.linear_1(model.vision_tower.hidden_states(images, [-2])[0][:, 1:])
        torch.testing.assert_close(outside.image_features(images), features, atol=0, rtol=0)
        spliced = outside.embed(images, input_ids.masked_fill(input_ids == IMAGE, VOCAB + 7))
        torch.testing.assert_close(spliced[input_ids == IMAGE], features.flatten(0, 1), atol=0, rtol=0)
        torch.testing.assert_close(spliced[input_ids != IMAGE],
                                   model.language_model.token_embedding(input_ids[input_ids != IMAGE]), atol=0, rtol=0)


def test_greedy_generation_equals_transformers(reference):
    hf, folder = reference
    model = create_model("llava", pretrained=folder)
    images, input_ids = pixels(2), prompts(2, 22)
    expected = hf.generate(pixel_values=images, input_ids=input_ids, do_sample=False, max_new_tokens=12,
                           eos_token_id=EOS, pad_token_id=PAD)[:, input_ids.shape[1]:]
    new = model.generate(images, input_ids, max_new_tokens=12)
    assert new.shape == (2, 12)
    assert torch.equal(new, expected)
    assert torch.equal(model.generate(images, input_ids, max_new_tokens=12, use_cache=False), expected)


def test_left_padded_generation_equals_transformers(reference):
    hf, folder = reference
    model = load_llava(folder)
    images, input_ids = pixels(2), prompts(2, 24)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3], attention_mask[1, :3] = PAD, 0
    input_ids[1, 3:19] = IMAGE  # the second prompt's image after its padding
    input_ids[1, 19:] = prompts(1, 5, features=0, seed=5)
    expected = hf.generate(pixel_values=images, input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                           max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)[:, input_ids.shape[1]:]
    new = model.generate(images, input_ids, max_new_tokens=8, padding_mask=attention_mask.bool())
    assert torch.equal(new, expected)


def test_beam_search_equals_transformers(reference):
    hf, folder = reference
    model = load_llava(folder)
    images, input_ids = pixels(2), prompts(2, 22)
    expected = hf.generate(pixel_values=images, input_ids=input_ids, do_sample=False, num_beams=3, max_new_tokens=6,
                           eos_token_id=EOS, pad_token_id=PAD)[:, input_ids.shape[1]:]
    new = model.generate(images, input_ids, max_new_tokens=6, num_beams=3)
    assert torch.equal(new, expected[:, : new.shape[1]]) and (expected[:, new.shape[1]:] == PAD).all()


# ---------------------------------------------------------------- presets and refusals


def test_presets():
    model = create_model("LLaVA-tiny")
    images = torch.randn(2, 3, 32, 32)
    input_ids = torch.randint(0, 1000, (2, 30))
    input_ids[:, 2:18] = LLAVA_MODELS["LLaVA-tiny"]["image_token_id"]
    assert model(images, input_ids).shape == (2, 30, 1024)
    assert model.generate(images, input_ids, max_new_tokens=4).shape[1] <= 4
    with torch.device("meta"):
        large = build_llava(**LLAVA_MODELS["LLaVA-1.5-7b"])
    assert large.features_per_image == 576 and large.language_model.token_embedding.num_embeddings == 32064
    assert large.vision_feature_layers == [-2] and isinstance(large.multi_modal_projector.act, torch.nn.GELU)


# llava-hf/llava-1.5-7b-hf's config.json (transformers 4.36): the sub-configs state only what differs from
# LlamaConfig's and LlavaConfig's defaults.
LLAVA_15_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}  # fmt: skip


def test_the_released_config_is_the_preset():
    kwargs = llava_config_to_kwargs(LLAVA_15_7B_CONFIG)
    assert preset_differences("LLaVA-1.5-7b", kwargs) == []
    assert kwargs["pad_id"] == 32001 and kwargs["eos_id"] == 2 and kwargs["vision"]["act"] == "quick_gelu"
    assert any("text.width=4096" in difference for difference in preset_differences("LLaVA-1.5-13b", kwargs))


def test_a_preset_checks_its_folder(reference):
    _, folder = reference
    with pytest.raises(BadInput, match=r"another model than the preset LLaVA-1.5-7b \(vision.image_size=16 "
                                       r"\(the preset's 336\).*text.width=64") as error:
        create_model("LLaVA-1.5-7b", pretrained=folder)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no overrides|unknown create_model override"):
        create_model("LLaVA-tiny", image_size=64)
    with pytest.raises(ValueError, match="takes its architecture from a folder"):
        create_model("llava")


def test_image_token_count_mismatch_is_one_line(reference):
    _, folder = reference
    model = load_llava(folder)
    input_ids = prompts(2, 24)
    for images, ids in ((pixels(1), input_ids), (pixels(2), input_ids[:, :10])):
        with pytest.raises(BadInput, match=r"input_ids hold \d+ image tokens \(id 100\), but \d image\(s\) x 16 "
                                           r"features") as error:
            model(images, ids)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("change, match", [
    (lambda config: config.update(mm_patch_merge_type="spatial_unpad"), "mm_patch_merge_type='spatial_unpad'"),
    (lambda config: config["vision_config"].update(use_swiglu=True), "vision_config: use_swiglu=True"),
    (lambda config: config["text_config"].update(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "yarn"),
    (lambda config: config.update(vision_feature_select_strategy="patch"), "vision_feature_select_strategy='patch'"),
    (lambda config: config.update(vision_feature_layer=7), "vision_feature_layer=7"),
    (lambda config: config.update(projector_hidden_act="swish"), "projector_hidden_act='swish'"),
    (lambda config: config.update(vocab_size=32064), "vocab_size=32064"),
    (lambda config: config.update(model_type="llava_next"), "model_type='llava_next'"),
])  # fmt: skip
def test_config_refusals_are_one_line(reference, tmp_path, change, match):
    def changed(config):
        change(config)
        return config

    folder = rewrite(reference[1], tmp_path, lambda key: key, changed)
    with pytest.raises(BadInput, match=match) as error:
        load_llava(folder)
    assert "\n" not in str(error.value)


def test_weights_that_do_not_fit_are_one_line(reference, tmp_path):
    folder = rewrite(reference[1], tmp_path, lambda key: key.replace("linear_2", "linear_3"))
    with pytest.raises(ValueError, match="missing keys .*multi_modal_projector.linear_2.weight.*unexpected keys "
                                         ".*linear_3") as error:
        load_llava(folder)
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match="no LLaVA folder"):
        load_llava(tmp_path / "nothing")
