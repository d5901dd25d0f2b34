"""Checkpoint conversion (models/convert.py, create_model(pretrained=...)): parity with open_clip, OpenAI's
TorchScript archives read without running them, round trips, presets and loud mismatches."""
import os
import pickle
import warnings
import zipfile
from typing import Iterator

import pytest
import torch
from torch import nn

from crossmodal.models import MODELS, convert, create_model, infer_preset

try:
    import open_clip  # test-only reference (the dev extra)
except ImportError:
    open_clip = None
needs_open_clip = pytest.mark.skipif(open_clip is None, reason="open_clip (the dev extra) is the reference")

CAPTIONS = ["a photo of a cat", "two dogs playing in the snow"]


def randomize_(model: nn.Module) -> nn.Module:
    """open_clip's init leaves biases at 0 and BatchNorm at the identity; random values make every key count."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point() and tensor.ndim == 1:
                tensor.add_(0.1 * torch.randn_like(tensor))
    return model.eval()


def openclip_reference(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_(open_clip.create_model(name, pretrained=None))


def tiny_openclip(resnet: bool) -> nn.Module:
    """open_clip's CLIP with our ViT-tiny / RN-tiny architecture and QuickGELU."""
    text_cfg = dict(context_length=32, vocab_size=1024, width=128, heads=4, layers=3)
    if resnet:
        vision_cfg = dict(image_size=64, layers=(1, 1, 1, 1), width=16, patch_size=None)
    else:
        vision_cfg = dict(image_size=64, layers=4, width=128, head_width=32, patch_size=8)  # 4 heads as in ViT-tiny
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=128, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=True)
    return randomize_(model)


def embeddings(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Image and text embeddings and image->text logits; works for open_clip's CLIP and ours."""
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(tokens)
        scale = model.logit_scale.exp()
        logits = scale * nn.functional.normalize(image, dim=-1) @ nn.functional.normalize(text, dim=-1).T
    return {"image": image, "text": text, "logits": logits}


def inputs(image_size: int, context_length: int = 77, vocab_size: int = 49408) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    images = torch.randn(2, 3, image_size, image_size)
    if context_length == 77:
        tokens = open_clip.tokenize(CAPTIONS)
        assert tokens.max() == 49407  # CLIP's end-of-text id
    else:  # tiny vocabulary: random ids, end-of-text as the largest id, then padding
        tokens = torch.zeros(2, context_length, dtype=torch.long)
        for row, length in enumerate((5, 14)):
            tokens[row, :length] = torch.randint(1, vocab_size - 1, (length,))
            tokens[row, length] = vocab_size - 1
    assert (tokens.argmax(dim=-1) == (tokens != 0).sum(dim=-1) - 1).all()  # EOT last before the zero padding
    return images, tokens


def assert_parity(ours: nn.Module, reference: nn.Module, image_size: int, atol: float = 1e-5, **token_kwargs) -> dict:
    images, tokens = inputs(image_size, **token_kwargs)
    got, expected = embeddings(ours.eval(), images, tokens), embeddings(reference.eval(), images, tokens)
    differences = {key: (got[key] - expected[key]).abs().max().item() for key in got}
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=0, msg=f"{key}: {differences}")
    return differences


class Node(nn.Module):
    """A module that only holds the tensors and children named by a checkpoint's dotted keys."""


def write_openai_archive(state_dict: dict[str, torch.Tensor], path: str, image_size: int) -> None:
    """A TorchScript archive laid out like OpenAI's releases: OpenAI's module names, fp16 weights (BatchNorm's
    counters stay int64) and the metadata tensors that openai/CLIP `build_model` deletes."""
    state_dict = {key: value.half() if value.is_floating_point() else value for key, value in state_dict.items()}
    state_dict["input_resolution"] = torch.tensor(image_size)
    state_dict["context_length"] = torch.tensor(state_dict["positional_embedding"].shape[0])
    state_dict["vocab_size"] = torch.tensor(state_dict["token_embedding.weight"].shape[0])
    root = Node()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, Node())
            module = module._modules[part]
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, OpenAI's files are not
        torch.jit.script(root).save(path)


def fp16_rounded(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return model


@pytest.fixture(scope="module")
def vit_b_32_archive(tmp_path_factory) -> Iterator[tuple[str, nn.Module]]:
    reference = openclip_reference("ViT-B-32-quickgelu")
    path = tmp_path_factory.mktemp("openai") / "ViT-B-32.pt"
    write_openai_archive(reference.state_dict(), str(path), image_size=224)
    yield str(path), fp16_rounded(reference)
    path.unlink()  # 300 MB: pytest keeps its last temporary folders


# ---------------------------------------------------------------- parity with open_clip


@needs_open_clip
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "RN50", "RN50-quickgelu"])
def test_open_clip_checkpoint_gives_open_clips_embeddings(name, tmp_path):
    reference = openclip_reference(name)
    path = tmp_path / "open_clip.pt"
    torch.save(reference.state_dict(), path)
    model = create_model(name, pretrained=path)
    path.unlink()  # 400-600 MB
    differences = assert_parity(model, reference, image_size=224)
    print(name, differences)  # shown with pytest -s


@needs_open_clip
def test_openai_archive_gives_open_clips_embeddings(vit_b_32_archive):
    path, reference = vit_b_32_archive
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right preset: no QuickGELU warning
        model = create_model("ViT-B-32-quickgelu", pretrained=path)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp16 in the file, upcast on load
    assert not any(tensor.is_meta for tensor in model.state_dict().values())  # built on meta, every tensor filled
    print("ViT-B-32-quickgelu archive", assert_parity(model, reference, image_size=224))


@needs_open_clip
def test_openai_archive_into_gelu_preset_warns_naming_quickgelu_preset(vit_b_32_archive):
    path, _ = vit_b_32_archive
    with pytest.warns(UserWarning, match="'ViT-B-32-quickgelu'"):
        create_model("ViT-B-32", pretrained=path)


@needs_open_clip
@pytest.mark.parametrize("name, resnet", [("RN-tiny", True), ("ViT-tiny", False)])
def test_tiny_openai_archive_parity(name, resnet, tmp_path):
    reference = tiny_openclip(resnet)
    path = str(tmp_path / "tiny.pt")
    write_openai_archive(reference.state_dict(), path, image_size=64)
    model = create_model(name, pretrained=path, act_layer="quick_gelu")
    assert_parity(model, fp16_rounded(reference), image_size=64, context_length=32, vocab_size=1024)


# ---------------------------------------------------------------- reading archives without running them


@needs_open_clip
def test_archive_reader_returns_every_tensor_with_its_dtype(vit_b_32_archive):
    path, reference = vit_b_32_archive
    state_dict = convert.read_torchscript_archive(path)
    expected = dict(reference.state_dict(), input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                    vocab_size=torch.tensor(49408))  # fmt: skip
    assert state_dict.keys() == expected.keys()
    assert state_dict["visual.conv1.weight"].dtype == torch.float16 and state_dict["vocab_size"].dtype == torch.int64
    for key, value in expected.items():
        assert torch.equal(state_dict[key].to(value.dtype), value), key
    assert convert.is_torchscript_archive(path)


def rewrite_zip(path: str, replace: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path) as source:
        entries = {name: replace.get(name, source.read(name)) for name in source.namelist()}
    with zipfile.ZipFile(path, "w") as target:
        for name, data in entries.items():
            target.writestr(name, data)


@needs_open_clip
def test_archive_code_is_never_run(tmp_path):
    reference = tiny_openclip(resnet=False)
    path = str(tmp_path / "tiny.pt")
    write_openai_archive(reference.state_dict(), path, image_size=64)
    with zipfile.ZipFile(path) as archive:
        code = [name for name in archive.namelist() if "/code/" in name]
    rewrite_zip(path, {name: b"this is not TorchScript: @@@\n" for name in code})
    with pytest.raises(Exception), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(path)  # the code is broken: running it fails
    model = create_model("ViT-tiny", pretrained=path, act_layer="quick_gelu")
    assert_parity(model, fp16_rounded(reference), image_size=64, context_length=32, vocab_size=1024)


class Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_archive_with_a_malicious_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"weight": Exploit(str(marker))}, protocol=2))
        archive.writestr("evil/code/__torch__.py", b"")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*system"):
        create_model("ViT-tiny", pretrained=path)
    assert not marker.exists()


def test_torch_save_pickle_with_a_malicious_global_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"logit_scale": Exploit(str(marker))}}, path)
    with pytest.raises(pickle.UnpicklingError):
        create_model("ViT-tiny", pretrained=path)
    assert not marker.exists()


# ---------------------------------------------------------------- open_clip checkpoint layouts and round trips


@needs_open_clip
@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_round_trip_open_clip_ours_open_clip_is_exact(name):
    reference_state = openclip_reference(name).state_dict()
    ours = convert.openclip_to_ours(reference_state)
    back = convert.ours_to_openclip(ours)
    assert list(back) == list(reference_state)
    for key, value in reference_state.items():
        assert back[key].shape == value.shape and back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # Through our module too: its state_dict exports to open_clip's keys and values.
    model = create_model(name)
    model.load_state_dict(ours)
    exported = convert.ours_to_openclip(model.state_dict())
    assert exported.keys() == reference_state.keys()
    assert all(torch.equal(exported[key], value) for key, value in reference_state.items())


@needs_open_clip
@pytest.mark.parametrize("layout", ["bare", "module", "nested", "nested-module"])
def test_open_clip_checkpoint_layouts(layout, tmp_path):
    reference = tiny_openclip(resnet=False)
    state_dict = reference.state_dict()
    if "module" in layout:
        state_dict = {f"module.{key}": value for key, value in state_dict.items()}
    checkpoint = {"epoch": 3, "name": "run", "state_dict": state_dict} if "nested" in layout else state_dict
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    model = create_model("ViT-tiny", pretrained=tmp_path / "checkpoint.pt", act_layer="quick_gelu")
    exported = convert.ours_to_openclip(model.state_dict())
    assert all(torch.equal(exported[key], value) for key, value in reference.state_dict().items())


def test_mismatch_error_names_missing_unexpected_keys_and_shapes(tmp_path):
    state_dict = convert.ours_to_openclip(create_model("ViT-tiny").state_dict())
    del state_dict["ln_final.bias"]
    state_dict["visual.extra_head.weight"] = torch.zeros(3)
    state_dict["text_projection"] = torch.zeros(128, 64)
    torch.save(state_dict, tmp_path / "broken.pt")
    with pytest.raises(ValueError) as error:
        create_model("ViT-tiny", pretrained=tmp_path / "broken.pt")
    message = str(error.value)
    assert "missing keys (1): text.norm.bias" in message
    assert "unexpected keys (1): visual.extra_head.weight" in message
    assert "text.proj: checkpoint (128, 64) vs model (128, 128)" in message


def test_checkpoints_that_are_not_clip_fail_loudly(tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): weight") as error:
        create_model("RN-tiny", pretrained=tmp_path / "other.pt")
    assert "architecture of" not in str(error.value)  # nothing to suggest
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state_dict"):
        create_model("RN-tiny", pretrained=tmp_path / "list.pt")


def shaped_like(name: str) -> dict[str, torch.Tensor]:
    """An open_clip state_dict of the right keys and shapes that costs no memory (expanded zeros)."""
    with torch.device("meta"):
        model = open_clip.model.CLIP(**open_clip.get_model_config(name))
    return {key: torch.zeros((), dtype=value.dtype).expand(value.shape) for key, value in model.state_dict().items()}


@needs_open_clip
def test_wrong_preset_suggests_the_right_name(tmp_path):
    torch.save(shaped_like("ViT-B-16"), tmp_path / "vit_b_16.pt")
    with pytest.raises(ValueError, match="architecture of 'ViT-B-16'") as error:
        create_model("ViT-B-32-quickgelu", pretrained=tmp_path / "vit_b_16.pt")
    assert "visual.patch_embed.proj.weight: checkpoint (768, 3, 16, 16) vs model (768, 3, 32, 32)" in str(error.value)


# ---------------------------------------------------------------- presets against open_clip's configs


@needs_open_clip
@pytest.mark.parametrize("name", sorted(MODELS.keys() - {"ViT-tiny", "RN-tiny"}))
def test_presets_match_open_clip_configs_and_layout(name):
    expected = open_clip.get_model_config(name)
    vision, text, preset = expected["vision_cfg"], expected["text_cfg"], MODELS[name]
    assert preset.act_layer == ("quick_gelu" if expected.get("quick_gelu") else "gelu")
    assert (preset.embed_dim, preset.image_size, preset.patch_size, preset.vision_width) == (
        expected["embed_dim"], vision["image_size"], vision["patch_size"], vision["width"]
    )
    assert preset.vision_layers == (tuple(vision["layers"]) if preset.patch_size is None else vision["layers"])
    assert (preset.text_width, preset.text_heads, preset.text_layers, preset.context_length, preset.vocab_size) == (
        text["width"], text["heads"], text["layers"], text["context_length"], text["vocab_size"]
    )
    # Same keys and shapes after conversion (meta tensors: no memory, no init cost), and the preset is recognised.
    with torch.device("meta"):
        ours = create_model(name)
    reference = shaped_like(name)
    exported = convert.ours_to_openclip(ours.state_dict())
    assert {k: (v.shape, v.dtype) for k, v in exported.items()} == {k: (v.shape, v.dtype) for k, v in reference.items()}
    assert infer_preset(ours.state_dict()) == name.removesuffix("-quickgelu")
    # Attention heads are not in the weights: compare the built modules.
    if preset.patch_size is not None:
        assert ours.visual.transformer.blocks[0].attn.num_heads == vision["width"] // vision.get("head_width", 64)
    else:
        assert ours.visual.attnpool.num_heads == vision["width"] * 32 // 64
