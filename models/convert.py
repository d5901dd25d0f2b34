"""Checkpoint key maps: OpenAI's released CLIP archives and open_clip checkpoints <-> this codebase's modules;
salesforce/BLIP and HuggingFace BLIP checkpoints -> `models.BLIP` (section "BLIP" below); MPT and OpenFlamingo;
and the checks every loader of a HuggingFace folder's config.json shares (section "HuggingFace config.json").

References: openai/CLIP `clip/clip.py:load` and `clip/model.py:build_model` (the released `.pt` files),
open_clip v3.3.0 `factory.py:load_checkpoint` and `model.py:build_model_from_openai_state_dict`.

Both references keep OpenAI's module names, so one "open_clip layout" describes both; the OpenAI files add
the metadata entries `input_resolution`, `context_length` and `vocab_size`. The maps here rename those keys
to the timm-style names of `models/` (and reshape `class_embedding`/`positional_embedding` to `cls_token`/
`pos_embed`); `ours_to_openclip` inverts them exactly (same keys, shapes, dtypes and values).

Deliberate differences from the references:
- OpenAI's files are TorchScript archives, which openai/CLIP and open_clip open with `torch.jit.load`, i.e. by
  running the archive's code. `read_torchscript_archive` never does: it unpickles only `data.pkl` with an
  allow-list (TorchScript module classes become inert attribute records, plus tensor rebuilding and storage
  types) and reads the storages from the zip; `code/` and `constants.pkl` are never opened.
- open_clip checkpoints are read with `torch.load(..., weights_only=True)`.
- A checkpoint that does not fit raises one error listing missing keys, unexpected keys and differing shapes
  (`describe_mismatch`), instead of `load_state_dict`'s first failure.
"""
import json
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from crossmodal.config import BadInput
from crossmodal.files import shown

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]

# Entries of OpenAI's archives that describe the model rather than weight it (openai/CLIP `build_model`
# deletes them before `load_state_dict`).
OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")

# (open_clip name, our name) key prefixes; a key takes the first pair whose prefix it starts with.
VIT_PREFIXES = (
    ("visual.conv1.", "visual.patch_embed.proj."),
    ("visual.class_embedding", "visual.cls_token"),
    ("visual.positional_embedding", "visual.pos_embed"),
    ("visual.ln_pre.", "visual.norm_pre."),
    ("visual.ln_post.", "visual.norm."),
    ("visual.transformer.resblocks.", "visual.transformer.blocks."),
)
TEXT_PREFIXES = (
    ("token_embedding.", "text.token_embedding."),
    ("positional_embedding", "text.pos_embed"),
    ("transformer.resblocks.", "text.transformer.blocks."),
    ("ln_final.", "text.norm."),
    ("text_projection", "text.proj"),
)
# (open_clip, ours) pieces of a key inside one transformer block.
BLOCK_PARTS = (
    (".ln_1.", ".norm1."),
    (".ln_2.", ".norm2."),
    (".attn.in_proj_weight", ".attn.qkv.weight"),
    (".attn.in_proj_bias", ".attn.qkv.bias"),
    (".attn.out_proj.", ".attn.proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
)


def _is_vit(state_dict: Mapping[str, Any]) -> bool:
    # Both layouts call the ViT's output projection `visual.proj`; the ResNet has `visual.attnpool` instead.
    return "visual.proj" in state_dict


def _rename(key: str, prefixes: tuple[tuple[str, str], ...], to_ours: bool) -> str:
    for openclip_prefix, our_prefix in prefixes:
        old, new = (openclip_prefix, our_prefix) if to_ours else (our_prefix, openclip_prefix)
        if key.startswith(old):
            key = new + key[len(old):]
            if new.endswith((".resblocks.", ".blocks.")):
                for openclip_part, our_part in BLOCK_PARTS:
                    old_part, new_part = (openclip_part, our_part) if to_ours else (our_part, openclip_part)
                    key = key.replace(old_part, new_part)
            return key
    return key


def openclip_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """open_clip / OpenAI layout -> `models.CLIP` layout. Unknown keys pass through (and fail the fit check)."""
    prefixes = (VIT_PREFIXES if _is_vit(state_dict) else ()) + TEXT_PREFIXES
    converted = {}
    for key, value in state_dict.items():
        key = _rename(key, prefixes, to_ours=True)
        if key == "visual.cls_token":
            value = value.reshape(1, 1, -1)  # (width,) -> (1, 1, width)
        elif key == "visual.pos_embed":
            value = value.unsqueeze(0)  # (1 + HW, width) -> (1, 1 + HW, width)
        converted[key] = value
    return converted


def ours_to_openclip(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """`models.CLIP` layout -> open_clip's `CLIP` layout (loads with open_clip's `load_state_dict`)."""
    prefixes = (VIT_PREFIXES if _is_vit(state_dict) else ()) + TEXT_PREFIXES
    converted = {}
    for key, value in state_dict.items():
        if key == "visual.cls_token":
            value = value.reshape(-1)  # (1, 1, width) -> (width,)
        elif key == "visual.pos_embed":
            value = value.squeeze(0)  # (1, 1 + HW, width) -> (1 + HW, width)
        converted[_rename(key, prefixes, to_ours=False)] = value
    return converted


# ---------------------------------------------------------------- reading files


class ScriptObject:
    """Inert stand-in for every TorchScript class in an archive: it only records the attributes it is given."""

    def __setstate__(self, state: Any) -> None:
        self.attributes = state if isinstance(state, dict) else {}


# Storage classes named in the pickle -> element dtype of the raw bytes in data/<key>.
STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *unused: Any) -> torch.Tensor:
    # Arguments of torch._utils._rebuild_tensor_v2; requires_grad, hooks and metadata do not matter here.
    return storage.as_strided(size, stride, offset)


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript `data.pkl` allowing nothing that can run code."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self.archive = archive
        self.root = root
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a weights archive needs only tensor data")

    def persistent_load(self, saved_id: Any) -> torch.Tensor:
        kind, dtype, key, _location, numel = saved_id
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
        if key not in self.storages:  # tensors may share one storage
            data = bytearray(self.archive.read(f"{self.root}data/{key}"))
            storage = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            if storage.numel() != numel:
                raise pickle.UnpicklingError(f"storage {key}: {storage.numel()} elements on disk, {numel} expected")
            self.storages[key] = storage
        return self.storages[key]


def _archive_root(archive: zipfile.ZipFile) -> str:
    names = archive.namelist()
    roots = [name[: -len("data.pkl")] for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
    if len(roots) != 1:
        raise ValueError(f"{archive.filename}: expected one <name>/data.pkl in the archive, found {len(roots)}")
    return roots[0]


def is_torchscript_archive(path: PathLike) -> bool:
    """TorchScript archives are zips with a `<name>/code/` folder; `torch.save` zips have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def read_torchscript_archive(path: PathLike) -> StateDict:
    """Every tensor of a TorchScript archive as a flat {dotted.name: tensor}, without executing the archive."""

    def walk(obj: ScriptObject, prefix: str) -> None:
        for name, value in getattr(obj, "attributes", {}).items():  # an object never given state has none
            if isinstance(value, torch.Tensor):
                state_dict[prefix + name] = value
            elif isinstance(value, ScriptObject):
                walk(value, f"{prefix}{name}.")

    with zipfile.ZipFile(path) as archive:
        root = _archive_root(archive)
        with archive.open(f"{root}data.pkl") as file:
            top = _ArchiveUnpickler(file, archive, root).load()
    if not isinstance(top, ScriptObject):
        raise ValueError(f"{path}: data.pkl holds {type(top).__name__}, not a TorchScript module")
    state_dict: StateDict = {}
    walk(top, "")
    return state_dict


def load_checkpoint(path: PathLike) -> tuple[StateDict, str]:
    """(state_dict in the open_clip layout, source) for an OpenAI `.pt` archive (source "openai") or an open_clip
    checkpoint (source "open_clip": a bare state_dict or a dict with "state_dict", `module.` prefix or not)."""
    if is_torchscript_archive(path):
        state_dict = read_torchscript_archive(path)
        for key in OPENAI_METADATA_KEYS:
            state_dict.pop(key, None)
        return state_dict, "openai"
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]  # open_clip's training checkpoint
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state_dict or a dict with 'state_dict', got {type(checkpoint).__name__}")
    if checkpoint and all(key.startswith("module.") for key in checkpoint):  # saved from a DDP wrapper
        checkpoint = {key[len("module."):]: value for key, value in checkpoint.items()}
    return checkpoint, "open_clip"


# ---------------------------------------------------------------- checks


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """'' when `found` has exactly the keys and shapes of `expected`, else what differs, in one line per kind."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shapes = [
        f"{key}: checkpoint {tuple(found[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in found and found[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if shapes:
        problems.append(f"shapes that differ ({len(shapes)}): {'; '.join(shapes)}")
    return "\n".join(problems)


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)})


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> Optional[dict[str, Any]]:
    """The `models.CLIPConfig` architecture fields implied by a state_dict in our layout, or None when it is not a
    CLIP of this codebase. Head counts are not stored; they follow OpenAI's width // 64 convention."""
    try:
        config: dict[str, Any] = {
            "embed_dim": state_dict["text.proj"].shape[1],
            "text_width": state_dict["text.norm.weight"].shape[0],
            "text_layers": _count_blocks(state_dict, "text.transformer.blocks."),
            "context_length": state_dict["text.pos_embed"].shape[0],
            "vocab_size": state_dict["text.token_embedding.weight"].shape[0],
        }
        config["text_heads"] = config["text_width"] // 64
        if _is_vit(state_dict):
            patch_weight = state_dict["visual.patch_embed.proj.weight"]  # (width, 3, patch, patch)
            grid = math.isqrt(state_dict["visual.pos_embed"].shape[1] - 1)
            config.update(
                patch_size=patch_weight.shape[-1],
                image_size=patch_weight.shape[-1] * grid,
                vision_width=patch_weight.shape[0],
                vision_layers=_count_blocks(state_dict, "visual.transformer.blocks."),
                vision_heads=patch_weight.shape[0] // 64,
            )
        else:
            width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
            grid = math.isqrt(state_dict["visual.attnpool.positional_embedding"].shape[0] - 1)
            config.update(
                patch_size=None,
                image_size=32 * grid,
                vision_width=width,
                vision_layers=tuple(_count_blocks(state_dict, f"visual.layer{stage}.") for stage in (1, 2, 3, 4)),
                vision_heads=width * 32 // 64,
            )
    except KeyError:
        return None
    return config


# ---------------------------------------------------------------- BLIP
#
# Two layouts hold released BLIP weights (reference note, section E.2):
# - salesforce/BLIP `.pth` files: `torch.load(path)['model']`, prefixes `visual_encoder.` (timm ViT names),
#   `text_encoder.` and `text_decoder.bert.` (HF BERT names, no token types), `text_decoder.cls.predictions.`,
#   `vision_proj`, `text_proj`, `itm_head`, `temp`, plus momentum copies and queues (training state, ignored);
# - HuggingFace `BlipForConditionalGeneration` / `BlipForImageTextRetrieval`: the same text keys, the ViT as
#   `vision_model.` (huggingface/transformers `convert_blip_original_pytorch_to_hf.py` renames only that side).
# `blip_to_ours` reads both into `models.BLIP`'s names, concatenating BERT's query/key/value into `qkv`/`kv`.

# (HF, salesforce) key pieces of the ViT.
BLIP_HF_VISION = (
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj."),
    ("vision_model.encoder.layers.", "visual_encoder.blocks."),
    ("vision_model.post_layernorm.", "visual_encoder.norm."),
    (".layer_norm1.", ".norm1."),
    (".layer_norm2.", ".norm2."),
    (".self_attn.qkv.", ".attn.qkv."),
    (".self_attn.projection.", ".attn.proj."),
)
# (salesforce, ours) key pieces, applied in order to every key.
BLIP_PARTS = (
    ("visual_encoder.blocks.", "visual_encoder.transformer.blocks."),
    ("text_decoder.bert.", "text_decoder."),
    ("text_decoder.cls.predictions.transform.dense.", "lm_head.dense."),
    ("text_decoder.cls.predictions.transform.LayerNorm.", "lm_head.norm."),
    ("text_decoder.cls.predictions.bias", "lm_head.bias"),
    (".embeddings.word_embeddings.", ".embed.token_embedding."),
    (".embeddings.position_embeddings.weight", ".embed.pos_embed"),
    (".embeddings.LayerNorm.", ".embed.norm."),
    (".encoder.layer.", ".transformer.blocks."),
    (".attention.self.query.", ".attn.q."),
    (".attention.self.key.", ".attn.k."),
    (".attention.self.value.", ".attn.v."),
    (".attention.output.dense.", ".attn.proj."),
    (".attention.output.LayerNorm.", ".norm1."),
    (".crossattention.self.query.", ".cross_attn.q."),
    (".crossattention.self.key.", ".cross_attn.k."),
    (".crossattention.self.value.", ".cross_attn.v."),
    (".crossattention.output.dense.", ".cross_attn.proj."),
    (".crossattention.output.LayerNorm.", ".norm_cross."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
    (".output.LayerNorm.", ".norm2."),
)
# Training state and duplicates that inference does not load: momentum encoders and projections, ITC queues,
# BERT's position_ids buffer and unused pooler, the LM head's decoder (tied to the word embeddings).
BLIP_IGNORED = (
    "visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m.", "image_queue", "text_queue",
    "queue_ptr", "idx_queue", "ptr_queue", "embeddings.position_ids", ".pooler.", "text_decoder.cls.predictions.decoder.",
)  # fmt: skip


def blip_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """salesforce/BLIP or HuggingFace BLIP keys -> `models.BLIP` keys; unknown keys pass through."""
    renamed: StateDict = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if any(part in key for part in BLIP_IGNORED):
            continue
        if key.startswith("vision_model."):
            for hf, salesforce in BLIP_HF_VISION:
                key = key.replace(hf, salesforce)
        for salesforce, ours in BLIP_PARTS:
            key = key.replace(salesforce, ours)
        renamed[key] = value
    # BERT's separate projections -> our fused ones: attn.{q,k,v} -> attn.qkv, cross_attn.{k,v} -> cross_attn.kv.
    for key in [key for key in renamed if ".attn.q." in key and ".cross_attn." not in key]:
        parts = [renamed.pop(key.replace(".attn.q.", f".attn.{name}.")) for name in "qkv"]
        renamed[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat(parts)  # (3 * width, width) or (3 * width,)
    for key in [key for key in renamed if ".cross_attn.k." in key]:
        parts = [renamed.pop(key.replace(".cross_attn.k.", f".cross_attn.{name}.")) for name in "kv"]
        renamed[key.replace(".cross_attn.k.", ".cross_attn.kv.")] = torch.cat(parts)  # (2 * width, context_dim)
    return renamed


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(1, 1 + N, width) -> (1, 1 + num_patches, width), the patch grid resized bicubically (BLIP's
    `models/vit.py::interpolate_pos_embed`); the CLS position stays."""
    old_grid, new_grid = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(num_patches)
    if old_grid == new_grid:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()  # (1, width, g, g)
    patch_pos = torch.nn.functional.interpolate(patch_pos, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)  # (1, new_grid^2, width)
    return torch.cat([cls_pos, patch_pos], dim=1)


# safetensors element types -> torch dtypes (the format: 8-byte little-endian header size, a JSON header
# {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def read_safetensors(path: PathLike) -> StateDict:
    """Every tensor of a `.safetensors` file, read without the safetensors package."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
        data = bytearray(file.read())
    state_dict: StateDict = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which this reader does not know")
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        flat = torch.frombuffer(data, dtype=dtype, offset=begin, count=(end - begin) // dtype.itemsize) if end > begin else torch.empty(0, dtype=dtype)
        state_dict[name] = flat.reshape(entry["shape"])
    return state_dict


def load_blip_checkpoint(path: PathLike) -> StateDict:
    """The raw state_dict of a salesforce `.pth`, a HuggingFace weights file, or a HuggingFace folder
    (model.safetensors or pytorch_model.bin; its config.json is `read_hf_config`'s)."""
    if os.path.isdir(path):
        names = [name for name in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, name))]
        if not names:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in the folder")
        path = os.path.join(path, names[0])
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # salesforce training checkpoints hold the weights under "model"
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state_dict or a dict with 'model', got {type(checkpoint).__name__}")
    return checkpoint


# ---------------------------------------------------------------- HuggingFace config.json
#
# A released folder's config.json says what the weights compute; the loaders (`models.blip.blip_config_from_hf`,
# `models.lm.mpt_config_to_kwargs`) read every architecture field of it, ignore on purpose the fields listed as
# not changing the model, and refuse any other (`check_hf_fields`): a field they do not know may change the
# architecture, and a model built without it would load the weights without a word and compute something else.

# What every transformers config may hold that leaves the model as it is: transformers' records, output switches,
# task labels and generation defaults (PretrainedConfig's common attributes, 4.x and 5.x; eval.py's options choose
# the decoding). `pruned_heads` is no record: `check_hf_fields` refuses a non-empty one.
HF_CONFIG_RECORDS = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "architectures",
    "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype", "use_bfloat16", "torchscript",
    "tf_legacy_loss", "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
    "is_encoder_decoder", "finetuning_task", "id2label", "label2id", "num_labels", "problem_type", "tokenizer_class",
    "prefix", "task_specific_params", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "decoder_start_token_id",
})  # fmt: skip


def read_hf_config(folder: PathLike) -> Optional[dict[str, Any]]:
    """A HuggingFace folder's config.json, or None when `folder` is no folder or has none."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"{shown(path)}: not a readable JSON config ({error})") from None
    if not isinstance(config, dict):
        raise BadInput(f"{shown(path)}: a config.json holds a JSON object; this one holds a {type(config).__name__}")
    return config


def check_hf_fields(section: Mapping[str, Any], read: Iterable[str], ignored: Iterable[str], where: str) -> None:
    """Refuse (BadInput) the fields of a config.json section (`where` names the file and section) that the loader
    neither reads nor ignores on purpose (`ignored`, HF_CONFIG_RECORDS), and pruned attention heads."""
    unknown = sorted(set(section) - set(read) - set(ignored) - HF_CONFIG_RECORDS - {"pruned_heads"})
    if unknown:
        values = ", ".join(f"{key}={section[key]!r}" for key in unknown)
        raise BadInput(f"{where}: {values}: field(s) this loader does not know, which may change the architecture; "
                       f"refused rather than loaded into a model that ignores them")
    if section.get("pruned_heads"):
        raise BadInput(f"{where}: pruned_heads={section['pruned_heads']!r}: models with pruned attention heads are "
                       f"not supported")


def hf_size(section: Mapping[str, Any], key: str, where: str, default: Any = None) -> int:
    """section[key] (default when absent; None: required) as a positive int, or BadInput naming it."""
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        given = f"{key}={value!r}" if key in section else f"no {key}"
        raise BadInput(f"{where}: {given}: it must be a positive whole number")
    return value


def hf_number(section: Mapping[str, Any], key: str, where: str, default: float) -> float:
    """section[key] (default when absent) as a positive finite float, or BadInput naming it."""
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise BadInput(f"{where}: {key}={value!r}: it must be a positive number")
    return float(value)


def hf_ratio(width: int, hidden: int, key: str, where: str) -> float:
    """An MLP's hidden size as the `mlp_ratio` of `models.layers.Block` (hidden = int(width * ratio)), or BadInput
    when no ratio gives it exactly."""
    ratio = hidden / width
    if int(width * ratio) != hidden:
        raise BadInput(f"{where}: {key}={hidden} is not representable as a multiple of the width {width}")
    return ratio


# ---------------------------------------------------------------- MPT and OpenFlamingo
#
# MPT (models/lm.py) comes in two HuggingFace layouts: transformers' `MptForCausalLM` ("mpt": norm_1, ffn.up_proj,
# norm_f, plus a tied lm_head) and MosaicML's remote-code `MosaicGPT` ("mosaic_gpt", the layout of
# mpt-1b-redpajama-200b: ln_1, mlp.mlp_up, ln_f, and attn.q_ln/k_ln for its QK LayerNorm). Both fuse the
# attention input projection as `Wqkv` in q, k, v order, which is our `qkv`.

# (HF or MosaicGPT, ours) key pieces, applied in order to every key.
MPT_PARTS = (
    ("transformer.wte.", "token_embedding."),
    ("transformer.norm_f.", "norm."),
    ("transformer.ln_f.", "norm."),
    (".norm_1.", ".norm1."),
    (".ln_1.", ".norm1."),
    (".norm_2.", ".norm2."),
    (".ln_2.", ".norm2."),
    (".attn.Wqkv.", ".attn.qkv."),
    (".attn.q_ln.", ".attn.q_norm."),
    (".attn.k_ln.", ".attn.k_norm."),
    (".attn.out_proj.", ".attn.proj."),
    (".ffn.up_proj.", ".mlp.fc1."),
    (".ffn.down_proj.", ".mlp.fc2."),
    (".mlp.mlp_up.", ".mlp.fc1."),
    (".mlp.mlp_down.", ".mlp.fc2."),
)
MPT_TIED = "lm_head.weight"  # the output matrix is the token embedding


def _mpt_key(key: str) -> str:
    for theirs, ours in MPT_PARTS:
        key = key.replace(theirs, ours)
    return key


def mpt_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """HF `MptForCausalLM` or MosaicGPT keys -> `models.lm.DecoderLM` keys; unknown keys pass through."""
    return {_mpt_key(key): value for key, value in state_dict.items() if key != MPT_TIED}


def read_hf_weights(path: PathLike) -> StateDict:
    """Every tensor of a HuggingFace folder's weights: `model.safetensors` or `pytorch_model.bin`, or their shards
    listed in `*.index.json`. `.bin` files are memory-mapped and read with `weights_only=True`."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = os.path.join(path, f"{name}.index.json")
        if os.path.exists(index):
            with open(index) as file:
                files = sorted(set(json.load(file)["weight_map"].values()))
            break
        if os.path.exists(os.path.join(path, name)):
            files = [name]
            break
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin (or their index) in the folder")
    state_dict: StateDict = {}
    for name in files:
        file_path = os.path.join(path, name)
        if name.endswith(".safetensors"):
            state_dict.update(read_safetensors(file_path))
        else:
            state_dict.update(torch.load(file_path, map_location="cpu", weights_only=True, mmap=True))
    return state_dict


# OpenFlamingo (mlfoundations/open_flamingo `src/helpers.py`) -> `models.flamingo`: (pattern, replacement) for the
# keys inside one PerceiverResampler (`layers.i.0` is PerceiverAttention, `layers.i.1` the FeedForward
# Sequential(LayerNorm, Linear, GELU, Linear)) and inside one GatedCrossAttentionBlock.
OPEN_FLAMINGO_RESAMPLER_PARTS = (
    (r"^layers\.(\d+)\.0\.norm_media\.", r"blocks.\1.norm_media."),
    (r"^layers\.(\d+)\.0\.norm_latents\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.0\.to_q\.", r"blocks.\1.attn.q."),
    (r"^layers\.(\d+)\.0\.to_kv\.", r"blocks.\1.attn.kv."),
    (r"^layers\.(\d+)\.0\.to_out\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.1\.0\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.1\.1\.", r"blocks.\1.mlp.fc1."),
    (r"^layers\.(\d+)\.1\.3\.", r"blocks.\1.mlp.fc2."),
)
OPEN_FLAMINGO_BLOCK_PARTS = (
    (r"^attn\.norm\.", "norm1."),
    (r"^attn\.to_q\.", "attn.q."),
    (r"^attn\.to_kv\.", "attn.kv."),
    (r"^attn\.to_out\.", "attn.proj."),
    (r"^ff\.0\.", "norm2."),
    (r"^ff\.1\.", "mlp.fc1."),
    (r"^ff\.3\.", "mlp.fc2."),
)
# Where a whole Flamingo checkpoint's parts go: `perceiver.` stays; gated block N (placed before LM layer N) goes
# to `gated_cross_attn_layers.N.`; the rest of `lang_encoder.` (an MPT) to `lang_model.`. OpenFlamingo's state
# dict holds every gated block and decoder layer twice: in the `FlamingoLayer` wrappers (`transformer.blocks.N.
# gated_cross_attn_layer`, `.decoder_layer`) and in `lang_encoder.gated_cross_attn_layers.N` and
# `old_decoder_blocks.N`. Its `filter_state_dict_to_trainable` keeps only the wrappers' gated blocks, yet loading
# the released OpenFlamingo-3B reports exactly those keys missing (open_flamingo issue #210): both copies map to
# ours. Decoder layers are read from the wrappers.
OPEN_FLAMINGO_BLOCK_PREFIX = re.compile(
    r"^lang_encoder\.(?:transformer\.blocks\.(\d+)\.gated_cross_attn_layer|gated_cross_attn_layers\.(\d+))\.")
OPEN_FLAMINGO_DECODER_LAYER = re.compile(r"^lang_encoder\.transformer\.blocks\.(\d+)\.decoder_layer\.")
OPEN_FLAMINGO_COPIES = ("lang_encoder.old_decoder_blocks.",)


def _substitute(key: str, parts: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in parts:
        key = re.sub(pattern, replacement, key)
    return key


def load_open_flamingo_checkpoint(path: PathLike) -> StateDict:
    """The state dict of an OpenFlamingo `checkpoint.pt` (OpenFlamingo layout): the released files are one; a
    training checkpoint of OpenFlamingo's train.py holds it under "model_state_dict"."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_state_dict"), dict):
        checkpoint = checkpoint["model_state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a state_dict or a dict with 'model_state_dict', got "
                         f"{type(checkpoint).__name__}")
    return checkpoint


def open_flamingo_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """OpenFlamingo parameter names -> this codebase's: a whole `checkpoint.pt` (keys `perceiver.`, `lang_encoder.`,
    `vision_encoder.`; DDP's `module.` and FSDP's `_checkpoint_wrapped_module.` removed) or the state dict of one
    `PerceiverResampler` or `GatedCrossAttentionBlock`. Vision-encoder and unknown keys pass through."""
    converted: StateDict = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.").replace("._checkpoint_wrapped_module", "")
        if key.startswith(OPEN_FLAMINGO_COPIES):
            continue
        if key.startswith("perceiver."):
            key = "perceiver." + _substitute(key.removeprefix("perceiver."), OPEN_FLAMINGO_RESAMPLER_PARTS)
        elif block := OPEN_FLAMINGO_BLOCK_PREFIX.match(key):
            inner = _substitute(key[block.end() :], OPEN_FLAMINGO_BLOCK_PARTS)
            key = f"gated_cross_attn_layers.{block.group(1) or block.group(2)}.{inner}"
        elif key.startswith("lang_encoder."):
            key = OPEN_FLAMINGO_DECODER_LAYER.sub(r"lang_encoder.transformer.blocks.\1.", key)
            mpt_key = key.removeprefix("lang_encoder.")
            if mpt_key == MPT_TIED:
                continue
            key = "lang_model." + _mpt_key(mpt_key)
        else:
            key = _substitute(_substitute(key, OPEN_FLAMINGO_RESAMPLER_PARTS), OPEN_FLAMINGO_BLOCK_PARTS)
        converted[key] = value
    return converted


# ---------------------------------------------------------------- LLaMA
#
# transformers' `LlamaForCausalLM` (models/llama.py): `model.embed_tokens`, `model.layers.N.{input_layernorm,
# self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}`, `model.norm`, `lm_head`. Ours
# fuse q, k, v (in that order, kv heads after the query heads) into `attn.qkv` and gate, up into `mlp.fc1` (gate
# first, `layers.Mlp(gated=True)`). A `LlamaModel`'s keys (no `model.` prefix, no lm_head: the language model
# inside transformers 5's LLaVA) map the same way. Folders saved by transformers 4.3x keep each layer's rotary
# `inv_freq` buffer: computed, not learned, and dropped here.

# (HF, ours) key pieces, applied in order to every key (after the `model.` prefix is removed).
LLAMA_PARTS = (
    ("embed_tokens.", "token_embedding."),
    ("layers.", "transformer.blocks."),  # no other piece holds "layers."
    (".input_layernorm.", ".norm1."),
    (".post_attention_layernorm.", ".norm2."),
    (".self_attn.o_proj.", ".attn.proj."),
    (".mlp.down_proj.", ".mlp.fc2."),
)
LLAMA_FUSED = (  # (ours, HF's parts in order)
    (".attn.qkv.", (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.")),
    (".mlp.fc1.", (".mlp.gate_proj.", ".mlp.up_proj.")),
)
LLAMA_BUFFERS = ".rotary_emb.inv_freq"


def llama_to_ours(state_dict: Mapping[str, torch.Tensor], tied: bool = False) -> StateDict:
    """HF `LlamaForCausalLM` (or `LlamaModel`) keys -> `models.llama.LlamaLM` keys; unknown keys pass through (and
    fail the fit check). tied: the output matrix is the token embedding, so a stored `lm_head.weight` is dropped."""
    renamed: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith(LLAMA_BUFFERS) or (tied and key == "lm_head.weight"):
            continue
        key = key.removeprefix("model.")
        for theirs, ours in LLAMA_PARTS:
            key = key.replace(theirs, ours)
        renamed[key] = value
    for ours, parts in LLAMA_FUSED:
        for key in [key for key in renamed if parts[0] in key]:
            names = [key.replace(parts[0], part) for part in parts]
            if all(name in renamed for name in names):  # else the parts pass through and fail the fit check
                renamed[key.replace(parts[0], ours)] = torch.cat([renamed.pop(name) for name in names])
    return renamed


def read_llama_weights(path: PathLike) -> StateDict:
    """`read_hf_weights` of a LLaMA folder, after checking that a sharded folder's index names shards that exist
    and that they hold the tensors it lists (a missing or truncated download fails naming the file)."""
    path = os.fspath(path)
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = os.path.join(path, f"{name}.index.json")
        if not os.path.exists(index):
            continue
        try:
            with open(index, "rb") as file:
                weight_map = json.load(file)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BadInput(f"{shown(index)}: not a readable weights index ({error})") from None
        missing = sorted({shard for shard in weight_map.values() if not os.path.isfile(os.path.join(path, shard))})
        if missing:
            raise FileNotFoundError(f"{shown(path)}: shard(s) {', '.join(missing)} listed in {os.path.basename(index)} "
                                    f"are not in the folder")
        state_dict = read_hf_weights(path)
        absent = [key for key in weight_map if key not in state_dict]
        if absent:
            raise BadInput(f"{shown(index)}: {len(absent)} tensor(s) it lists are in no shard, e.g. {absent[0]} "
                           f"(in {weight_map[absent[0]]})")
        return state_dict
    return read_hf_weights(path)


# ---------------------------------------------------------------- HuggingFace CLIP vision tower and LLaVA
#
# transformers' `CLIPVisionModel` (LLaVA's image tower): `embeddings.{class_embedding, patch_embedding,
# position_embedding}`, `pre_layrnorm` (sic), `encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj,
# layer_norm2, mlp.fc1, mlp.fc2}`, `post_layernorm`; folders of transformers 4.x put all of it under
# `vision_model.` (5.x saves it without), and 4.3x files also hold the `embeddings.position_ids` buffer (computed,
# dropped here). `clip_vision_to_ours` reads the tables of the export section below backwards, into a
# `models.vit.VisionTransformer` (no `proj`: CLIPVisionModel has no projection).
#
# LLaVA folders (llava-hf) come in three layouts: released 4.x files (`language_model.model.*`,
# `language_model.lm_head.*`, `multi_modal_projector.*`, `vision_tower.vision_model.*`), the module tree of
# transformers >= 4.52 (`model.language_model.*` for the LlamaModel, `model.multi_modal_projector.*`,
# `model.vision_tower.vision_model.*` or, in 5.x, `model.vision_tower.*`, and `lm_head.*`), and what 5.x
# `save_pretrained` writes (the 4.x prefixes again, the tower without `vision_model.`). `llava_to_ours` maps any of
# them to `models.llava.LLaVA` (`vision_tower.`, `multi_modal_projector.`, `language_model.` = `LlamaLM`).

CLIP_VISION_BUFFERS = "embeddings.position_ids"
# (HF LLaVA prefix, the part it belongs to), longest first: a key takes the first that it starts with.
LLAVA_PREFIXES = (
    ("model.vision_tower.", "vision_tower"),
    ("model.multi_modal_projector.", "multi_modal_projector"),
    ("model.language_model.", "language_model"),  # a LlamaModel's keys: embed_tokens, layers, norm
    ("language_model.", "language_model"),  # a LlamaForCausalLM's: model.*, lm_head
    ("vision_tower.", "vision_tower"),
    ("multi_modal_projector.", "multi_modal_projector"),
    ("lm_head.", "language_model"),
)


def clip_vision_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers' `CLIPVisionModel` keys (with or without `vision_model.`) -> `models.vit.VisionTransformer`
    keys: q/k/v concatenated into `attn.qkv`, the class and position embeddings reshaped; unknown keys pass through
    (and fail the fit check)."""
    prefixes = [(theirs.removeprefix("vision_model."), ours.removeprefix("visual."))
                for ours, theirs in HF_CLIP_PREFIXES if ours.startswith("visual.")]
    renamed: StateDict = {}
    for key, value in state_dict.items():
        key = key.removeprefix("vision_model.")
        if key == CLIP_VISION_BUFFERS:
            continue
        if key == "embeddings.class_embedding":
            key, value = "cls_token", value.reshape(1, 1, -1)  # (width,) -> (1, 1, width)
        elif key == "embeddings.position_embedding.weight":
            key, value = "pos_embed", value.unsqueeze(0)  # (1 + HW, width) -> (1, 1 + HW, width)
        else:
            for theirs, ours in prefixes:
                if key.startswith(theirs):
                    key = ours + key[len(theirs):]
                    break
            for ours, theirs in HF_CLIP_BLOCK_PARTS:
                key = key.replace(theirs, ours)
        renamed[key] = value
    for key in [key for key in renamed if ".self_attn.q_proj." in key]:
        names = [key.replace(".self_attn.q_proj.", f".self_attn.{name}_proj.") for name in "qkv"]
        if all(name in renamed for name in names):  # else the parts pass through and fail the fit check
            renamed[key.replace(".self_attn.q_proj.", ".attn.qkv.")] = torch.cat([renamed.pop(name) for name in names])
    return renamed


def llava_to_ours(state_dict: Mapping[str, torch.Tensor], tied: bool = False) -> StateDict:
    """HF `LlavaForConditionalGeneration` keys in any of the layouts above -> `models.llava.LLaVA` keys; tied: the
    language model's output matrix is its token embedding (a stored lm_head is dropped). Keys of no part pass
    through (and fail the fit check)."""
    parts: dict[str, StateDict] = {"vision_tower": {}, "multi_modal_projector": {}, "language_model": {}}
    other: StateDict = {}
    for key, value in state_dict.items():
        for prefix, part in LLAVA_PREFIXES:
            if key.startswith(prefix):
                inner = key if prefix == "lm_head." else key[len(prefix):]
                parts[part][inner] = value
                break
        else:
            other[key] = value
    converted = {f"vision_tower.{key}": value for key, value in clip_vision_to_ours(parts["vision_tower"]).items()}
    converted.update({f"multi_modal_projector.{key}": value for key, value in parts["multi_modal_projector"].items()})
    language = llama_to_ours(parts["language_model"], tied=tied)
    converted.update({f"language_model.{key}": value for key, value in language.items()})
    return {**converted, **other}


# ---------------------------------------------------------------- export: ours -> HuggingFace and safetensors
#
# What `export.py --to hf` writes (issue 29): `models.CLIP` (ViT image tower) as transformers' `CLIPModel`, and
# `models.BLIP` as `BlipForConditionalGeneration` and `BlipForImageTextRetrieval` (one weights file holds both
# layouts' keys; each class loads its own). References: transformers 5.25 `models/clip/modeling_clip.py` and
# `convert_clip_original_pytorch_to_hf.py` (the key table below, read the other way), `models/blip/modeling_blip*.py`.
# Deliberate differences from HF's own CLIP conversion: no position_ids buffer (transformers 5 does not persist
# it), and the text's end-of-text id goes into config.json (HF pools at its first occurrence; OpenAI's CLIP at the
# largest id, which is the same position for CLIP's BPE, and the right one for a tokenizer whose eos is not largest).

# (ours, HF CLIPModel) key prefixes and pieces inside one block; the fused qkv is split by `_split_qkv`.
HF_CLIP_PREFIXES = (
    ("visual.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual.norm_pre.", "vision_model.pre_layrnorm."),  # sic: transformers' name
    ("visual.norm.", "vision_model.post_layernorm."),
    ("visual.transformer.blocks.", "vision_model.encoder.layers."),
    ("text.token_embedding.", "text_model.embeddings.token_embedding."),
    ("text.transformer.blocks.", "text_model.encoder.layers."),
    ("text.norm.", "text_model.final_layer_norm."),
)
HF_CLIP_BLOCK_PARTS = ((".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.proj.", ".self_attn.out_proj."))


def _split_qkv(key: str, value: torch.Tensor, names: tuple[str, ...], fused: str, into: str) -> StateDict:
    """A fused projection `fused` in `key` (rows q, k, v or k, v) -> one tensor per name: `into`.format(name)."""
    return {key.replace(fused, into.format(name)): part.clone() for name, part in zip(names, value.chunk(len(names)))}


def ours_to_hf_clip(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """`models.CLIP` with a ViT image tower -> transformers' `CLIPModel` keys (projections transposed, the class
    and position embeddings flattened, qkv split into q_proj/k_proj/v_proj); BadInput for a ResNet tower, which
    CLIPModel does not have, or a key it has no place for (a SigLIP bias: see export.py)."""
    if not _is_vit(state_dict):
        raise BadInput("transformers' CLIPModel has no ResNet image tower; export this model --to open_clip or onnx")
    converted: StateDict = {}
    for key, value in state_dict.items():
        if key == "logit_scale":
            converted[key] = value
        elif key == "visual.cls_token":
            converted["vision_model.embeddings.class_embedding"] = value.reshape(-1)  # (1, 1, width) -> (width,)
        elif key == "visual.pos_embed":
            converted["vision_model.embeddings.position_embedding.weight"] = value[0]  # (1 + HW, width)
        elif key == "text.pos_embed":
            converted["text_model.embeddings.position_embedding.weight"] = value  # (context_length, width)
        elif key in ("visual.proj", "text.proj"):  # ours x @ proj (width, embed); HF Linear (embed, width)
            converted["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = value.T.contiguous()
        else:
            new = next((theirs + key[len(ours):] for ours, theirs in HF_CLIP_PREFIXES if key.startswith(ours)), None)
            if new is None:
                raise BadInput(f"transformers' CLIPModel has no place for the weight '{key}'")
            for ours, theirs in HF_CLIP_BLOCK_PARTS:
                new = new.replace(ours, theirs)
            if ".attn.qkv." in new:
                converted.update(_split_qkv(new, value, ("q", "k", "v"), ".attn.qkv.", ".self_attn.{}_proj."))
            else:
                converted[new] = value
    return converted


def _activation(module: torch.nn.Module) -> str:
    """transformers' hidden_act of a block's MLP ("quick_gelu" or "gelu"), from its module's class name."""
    name = type(module.mlp.act).__name__
    if name not in ("QuickGELU", "GELU") or getattr(module.mlp.act, "approximate", "none") != "none":
        raise BadInput(f"an MLP activation {name} that transformers' CLIP does not name")
    return "quick_gelu" if name == "QuickGELU" else "gelu"


def hf_clip_config(model: torch.nn.Module, pad_id: int, bos_id: int, eos_id: int) -> dict[str, Any]:
    """config.json of transformers' `CLIPConfig` for a `models.CLIP` with a ViT tower: every field the peer's
    modules read (sizes, heads, activation, LayerNorm eps, projection, the temperature's start value)."""
    visual, text = model.visual, model.text
    vision_block, text_block = visual.transformer.blocks[0], text.transformer.blocks[0]
    vision_width = visual.cls_token.shape[-1]
    text_width = text.token_embedding.embedding_dim
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": model.embed_dim,
        "logit_scale_init_value": float(model.logit_scale.detach()),
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "hidden_size": text_width,
            "intermediate_size": text_block.mlp.fc1.out_features,
            "num_hidden_layers": len(text.transformer.blocks),
            "num_attention_heads": text_block.attn.num_heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": _activation(text_block),
            "layer_norm_eps": text.norm.eps,
            "projection_dim": model.embed_dim,
            "pad_token_id": pad_id,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": vision_width,
            "intermediate_size": vision_block.mlp.fc1.out_features,
            "num_hidden_layers": len(visual.transformer.blocks),
            "num_attention_heads": vision_block.attn.num_heads,
            "image_size": visual.image_size,
            "patch_size": visual.patch_embed.proj.kernel_size[0],
            "num_channels": 3,
            "hidden_act": _activation(vision_block),
            "layer_norm_eps": visual.norm.eps,
            "projection_dim": model.embed_dim,
        },
    }


def ours_to_blip_hf(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """`models.BLIP` keys -> HuggingFace BLIP keys, the inverse of `blip_to_ours` on HF checkpoints: the tables
    above read backwards, fused qkv/kv split into BERT's query/key/value, the decoder's output matrix written as
    its (tied) word embedding. The result holds both `BlipForConditionalGeneration`'s keys (vision_model,
    text_decoder) and `BlipForImageTextRetrieval`'s (vision_model, text_encoder, projections, itm_head), for the
    parts the model has; `temp` (no HF key) and momentum copies and queues (training state) are left out."""
    text_parts = BLIP_PARTS[5:]  # the BERT-side pieces; BLIP_PARTS[:5] are the ViT blocks, decoder and LM head
    converted: StateDict = {}
    for key, value in state_dict.items():
        if key == "temp" or key.split(".")[0].endswith("_m") or key.startswith("queue."):
            continue
        if key.startswith("visual_encoder."):
            key = key.replace("visual_encoder.transformer.blocks.", "visual_encoder.blocks.")
            for hf, salesforce in BLIP_HF_VISION:
                key = key.replace(salesforce, hf)
        elif key.startswith("lm_head."):
            for salesforce, ours in BLIP_PARTS[2:5]:
                key = key.replace(ours, salesforce)
        elif key.startswith(("text_encoder.", "text_decoder.")):
            if key.startswith("text_decoder."):
                key = "text_decoder.bert." + key[len("text_decoder."):]
            for salesforce, ours in reversed(text_parts):
                key = key.replace(ours, salesforce)
        elif not key.startswith(("vision_proj.", "text_proj.", "itm_head.")):
            raise BadInput(f"transformers' BLIP has no place for the weight '{key}' (its image tower is a ViT)")
        if ".attn.qkv." in key:  # the tables leave the fused names as they are (HF's ViT has .self_attn.qkv.)
            converted.update(_split_qkv(key, value, ("query", "key", "value"), ".attn.qkv.", ".attention.self.{}."))
        elif ".cross_attn.kv." in key:
            converted.update(_split_qkv(key, value, ("key", "value"), ".cross_attn.kv.", ".crossattention.self.{}."))
        else:
            converted[key] = value
    embedding = converted.get("text_decoder.bert.embeddings.word_embeddings.weight")
    if embedding is not None and "text_decoder.cls.predictions.bias" in converted:  # BERT ties both in its head
        converted["text_decoder.cls.predictions.decoder.weight"] = embedding.clone()
        converted["text_decoder.cls.predictions.decoder.bias"] = converted["text_decoder.cls.predictions.bias"].clone()
    return converted


def hf_blip_config(model: torch.nn.Module) -> dict[str, Any]:
    """config.json of transformers' `BlipConfig` for a `models.BLIP` with a ViT tower: the fields
    `models.blip.blip_config_from_hf` reads (so that `create_model(..., pretrained=folder)` builds it back)."""
    visual = model.visual_encoder
    text = model.text_encoder if model.text_encoder is not None else model.text_decoder
    vision_block, text_block = visual.transformer.blocks[0], text.transformer.blocks[0]
    vision_width = visual.cls_token.shape[-1]
    return {
        "architectures": ["BlipForConditionalGeneration", "BlipForImageTextRetrieval"],
        "model_type": "blip",
        "image_text_hidden_size": model.vision_proj.out_features if model.vision_proj is not None else 256,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "blip_text_model",
            "vocab_size": text.embed.token_embedding.num_embeddings,
            "hidden_size": text.width,
            "num_hidden_layers": len(text.transformer.blocks),
            "num_attention_heads": text_block.attn.num_heads,
            "intermediate_size": text_block.mlp.fc1.out_features,
            "max_position_embeddings": text.embed.pos_embed.shape[0],
            "hidden_act": "gelu",
            "layer_norm_eps": text.embed.norm.eps,
            "encoder_hidden_size": vision_width,
            "is_decoder": True,
            "tie_word_embeddings": True,
            "pad_token_id": model.pad_id,
            "bos_token_id": model.dec_id,
            "sep_token_id": model.eos_id,
        },
        "vision_config": {
            "model_type": "blip_vision_model",
            "hidden_size": vision_width,
            "num_hidden_layers": len(visual.transformer.blocks),
            "num_attention_heads": vision_block.attn.num_heads,
            "intermediate_size": vision_block.mlp.fc1.out_features,
            "image_size": visual.image_size,
            "patch_size": visual.patch_embed.proj.kernel_size[0],
            "num_channels": 3,
            "hidden_act": "gelu",
            "layer_norm_eps": visual.norm.eps,
        },
    }


def openclip_model_config(model: torch.nn.Module, eos_id: int) -> dict[str, Any]:
    """open_clip's model config (its `model_configs/<name>.json` format) of a `models.CLIP`: what
    `open_clip.add_model_config` registers for `create_model` to build this architecture. The text is pooled at
    the largest id (open_clip's default, OpenAI's) when that is the tokenizer's end-of-text `eos_id`, else at
    `eos_id` (open_clip's pool_type "eos"), which is where ours pools."""
    visual, text = model.visual, model.text
    text_block = text.transformer.blocks[0]
    text_cfg: dict[str, Any] = {
        "context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.token_embedding.embedding_dim,
        "heads": text_block.attn.num_heads, "layers": len(text.transformer.blocks),
        "mlp_ratio": text_block.mlp.fc1.out_features / text.token_embedding.embedding_dim,
    }  # fmt: skip
    if eos_id != text.vocab_size - 1:
        text_cfg.update(pool_type="eos", eos_id=eos_id)
    if hasattr(visual, "attnpool"):  # ModifiedResNet: open_clip derives the pool's heads from the stem width
        width = visual.bn3.num_features
        if visual.attnpool.num_heads != width * 32 // 64:
            raise BadInput(f"open_clip's ResNet has {width * 32 // 64} attention-pool heads at width {width}; this "
                           f"model has {visual.attnpool.num_heads}")
        layers = [len(getattr(visual, f"layer{stage}")) for stage in (1, 2, 3, 4)]
        vision_cfg = {"image_size": visual.image_size, "layers": layers, "width": width, "patch_size": None}
    else:
        block, width = visual.transformer.blocks[0], visual.cls_token.shape[-1]
        vision_cfg = {
            "image_size": visual.image_size, "layers": len(visual.transformer.blocks), "width": width,
            "patch_size": visual.patch_embed.proj.kernel_size[0], "head_width": width // block.attn.num_heads,
            "mlp_ratio": block.mlp.fc1.out_features / width,
        }  # fmt: skip
    config = {"embed_dim": model.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if _activation(text_block) == "quick_gelu":
        config["quick_gelu"] = True
    if model.logit_bias is not None:  # SigLIP
        config["init_logit_bias"] = float(model.logit_bias.detach())
    return config


SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(file: Any, tensors: Mapping[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Write `tensors` to an open binary file in the safetensors format (see SAFETENSORS_DTYPES), without the
    safetensors package: tensors in name order, the header padded with spaces to 8 bytes as the package pads it."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_NAMES:
            raise BadInput(f"tensor {name}: dtype {tensor.dtype} has no safetensors name")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    file.write(len(encoded).to_bytes(8, "little"))
    file.write(encoded)
    for name in names:  # little-endian raw bytes, as torch holds them on every platform it runs on
        file.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
