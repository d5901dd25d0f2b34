"""Released-weight folders whose config.json this codebase cannot build, through the real entry points
(tests/bad_inputs.py): refused in one line naming the field, exit 2, the folder untouched, before any weights are
read. A HuggingFace BLIP folder (eval.py --model BLIP-base), an MPT folder as OpenFlamingo's language model
(eval.py --model Flamingo-tiny --lm) and as a language-model run's start (train.py model.pretrained)."""
import json

import pytest

from tests.bad_inputs import fingerprint, refused, run
from tests.test_gpt_neox_tokenizer import tokenizer_json  # noqa: F401 (a fixture: the tiny GPT-NeoX-like tokenizer)

transformers = pytest.importorskip("transformers")  # writes the config.json files as transformers does


def blip_folder(folder, section: str, field: str, value) -> str:
    """A HuggingFace BLIP folder (config.json, vocab.txt, a stand-in weights file) with one field changed."""
    config = transformers.BlipConfig().to_dict()
    config[section][field] = value
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    (folder / "model.safetensors").write_bytes(b"never read")
    return str(folder)


@pytest.mark.parametrize("section, field, value", [
    ("text_config", "hidden_act", "relu"),  # an activation this model does not compute
    ("vision_config", "num_channels", 1),
    ("text_config", "position_embedding_type", "relative_key"),  # unknown: refused, not ignored
])  # fmt: skip
def test_blip_folder_this_model_cannot_be(tmp_path, section, field, value):
    folder = blip_folder(tmp_path / "blip", section, field, value)
    before = fingerprint(folder)
    result = run(["eval.py", "--model", "BLIP-base", "--pretrained", folder, "--task", "retrieval", "--data",
                  "shapes:val:4"])
    refused(result, "config.json", section, f"{field}={value!r}")
    assert fingerprint(folder) == before


def mpt_folder(folder, tokenizer_file=None, **changes) -> str:
    """A MosaicGPT folder's config.json (mpt-1b-redpajama-200b's fields) with `changes`, and a stand-in weights file."""
    config = {
        "model_type": "mosaic_gpt", "d_model": 128, "n_heads": 4, "n_layers": 2, "mlp_ratio": 4, "max_seq_len": 128,
        "vocab_size": 576, "alibi": True, "alibi_bias_max": 8, "attn_qk_ln": False, "attn_clip_qkv": None,
        "softmax_scale": None, "logit_scale": None, "no_bias": True, "prefix_lm": False, **changes,
    }  # fmt: skip
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pytorch_model.bin").write_bytes(b"never read")
    if tokenizer_file:
        (folder / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    return str(folder)


def test_open_flamingo_language_model_this_model_cannot_be(tmp_path, tokenizer_json):  # noqa: F811
    lm = mpt_folder(tmp_path / "mpt", tokenizer_json, attn_clip_qkv=6.0)  # an MPT option not implemented
    for name in ("checkpoint.pt", "clip.pt"):  # never read: the language model's config is refused first
        (tmp_path / name).write_bytes(b"never read")
    before = fingerprint(str(tmp_path))
    result = run(["eval.py", "--model", "Flamingo-tiny", "--pretrained", str(tmp_path / "checkpoint.pt"), "--vision",
                  str(tmp_path / "clip.pt"), "--lm", lm, "--task", "fewshot_vqa", "--data", "shapes_icl:val:4"])
    refused(result, "config.json", "attn_clip_qkv=6.0", "no QKV clipping only")
    assert fingerprint(str(tmp_path)) == before


def test_training_from_a_folder_the_preset_cannot_rebuild(tmp_path):
    """lm-tiny named, a folder of 8 heads given: the run would resume and evaluate as lm-tiny's 4 heads."""
    folder = mpt_folder(tmp_path / "mpt", n_heads=8)
    before = fingerprint(folder)
    result = run(["train.py", "--config", "configs/lm/tiny_shapes.yaml", f"--out_dir={tmp_path / 'run'}",
                  f"--model.pretrained={folder}", "--train.steps=1"])
    refused(result, "model.pretrained", "n_heads=8 (the preset's 4)")
    assert fingerprint(folder) == before and not (tmp_path / "run").exists()
