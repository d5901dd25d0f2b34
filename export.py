"""Export a model to the formats its peers load (issue 29): open_clip, HuggingFace transformers, ONNX. The model is
named as eval.py names it: a train.py run's --checkpoint, or --model NAME --pretrained FILE|TAG.

    python -m crossmodal.export --model ViT-B-32-quickgelu --pretrained ViT-B-32.pt --to open_clip --out vit_b_32.pt
    python -m crossmodal.export --checkpoint RUN/checkpoint.pt --to hf --out RUN/hf
    python -m crossmodal.export --model BLIP-base --pretrained model_base.pth --vocab vocab.txt --to hf --out blip-hf
    python -m crossmodal.export --checkpoint RUN/checkpoint.pt --to onnx --out RUN/onnx

--to open_clip (CLIP and SigLIP): one file, a state dict in open_clip's layout that
    `open_clip.create_model(NAME, pretrained=OUT)` loads. Where the model is not exactly open_clip's preset NAME
    (a tiny preset; a run's image size, context length or vocabulary; a SigLIP bias; a tokenizer whose end-of-text
    id is not its largest) it also writes OUT's stem + ".json", an open_clip model config:
    `open_clip.add_model_config("STEM.json")`, then `open_clip.create_model("STEM", pretrained=OUT)`.
--to hf: a folder with config.json and model.safetensors, for transformers' `CLIPModel.from_pretrained` (CLIP with
    a ViT image tower; CLIPModel has none of ResNet) or `BlipForConditionalGeneration` / `BlipForImageTextRetrieval`
    (BLIP with a ViT: one weights file holds the keys of both, each class loads its own). Beside them the tokenizer
    files where the peer has the tokenizer: vocab.json + merges.txt for `CLIPTokenizer` (CLIP's BPE), vocab.txt +
    tokenizer_config.json for `BertTokenizer` with BLIP's [DEC] and [ENC]; a sentencepiece run's has no HF twin.
--to onnx (CLIP and SigLIP): a folder with image_encoder.onnx, images (B, 3, H, W) float32 -> (B, embed_dim), and
    text_encoder.onnx, token ids (B, T) int64 -> (B, embed_dim), T fixed at the model's context length, B dynamic;
    the features as encode_image / encode_text return them (not normalised). Needs the `export` extra (onnx,
    onnxscript): torch.onnx's dynamo exporter, the one torch 2.14 maintains (the TorchScript one is deprecated).

Outputs go to a temporary name next to --out and are renamed into place when complete, so a failure leaves no
half-written export. An --out that exists is refused unless --force, which replaces only a file, or a folder that
holds nothing but what an export writes (it never deletes other files). Known failures (a BLIP asked for open_clip
or onnx, a ResNet CLIP for hf, an unknown model, a missing file) are one line on stderr and exit status 2.

Deliberate differences from the peers' own converters: safetensors files are written by `models.convert`'s writer,
so `--to hf` needs no package beyond torch; the exported text encoder pools at the last non-pad token as ours does
(for CLIP's BPE the same position as OpenAI's argmax of the ids).
"""
import argparse
import gzip
import importlib.util
import json
import os
import shutil
import tempfile
import warnings

import torch
from torch import nn

from crossmodal.config import BadInput, fail
from crossmodal.data.tokenizer import CLIP_MERGES, BertTokenizer, ClipTokenizer, byte_symbols
from crossmodal.files import shown, write_atomic
from crossmodal.models import MODELS, TINY_MODELS, convert, create_model
from crossmodal.models.blip import BLIP
from crossmodal.models.clip import CLIP
from crossmodal.models.layers import PatchEmbed
from crossmodal.models.text import text_lengths
from crossmodal.recipes import load_released, load_run
from crossmodal.recipes.clip import BPE_FILE

TARGETS = ("open_clip", "hf", "onnx")
ONNX_OPSET = 18  # LayerNormalization is an op from 17; onnxruntime 1.32 runs up to 23
ONNX_INLINE_LIMIT = 1 << 30  # bytes of weights past which an .onnx keeps them in a .data file (protobuf: 2 GiB)
# Every name an export writes into a folder: --force replaces a folder of these only.
EXPORT_FILES = {
    "config.json", "model.safetensors", "vocab.json", "merges.txt", "vocab.txt", "tokenizer_config.json",
    "special_tokens_map.json", "image_encoder.onnx", "text_encoder.onnx", "image_encoder.onnx.data",
    "text_encoder.onnx.data",
}  # fmt: skip


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--checkpoint", help="a train.py checkpoint: RUN/checkpoint.pt, or an FSDP run's folder RUN/checkpoint")
    add("--model", help="a preset for released weights, e.g. ViT-B-32-quickgelu, RN50, BLIP-base")
    add("--pretrained", help="with --model: an OpenAI .pt file or an open_clip checkpoint (BLIP: salesforce's .pth or "
                             "a HF folder)")
    add("--bpe", help=f"with a CLIP --model: the vocabulary {BPE_FILE} (default: next to --pretrained, else "
                      f"open_clip's)")
    add("--vocab", help="with a BLIP --model: BERT's vocab.txt (default: the one in or next to --pretrained)")
    add("--to", required=True, choices=TARGETS, help="open_clip: a state dict file; hf: a transformers folder; onnx: a "
                                                      "folder with image_encoder.onnx and text_encoder.onnx")
    add("--out", required=True, help="the file (open_clip) or folder (hf, onnx) to write")
    add("--force", action="store_true", help="replace an existing --out (a folder only if it holds nothing but an "
                                             "export's files)")
    args = parser.parse_args(argv)
    if bool(args.checkpoint) == bool(args.model) or bool(args.model) != bool(args.pretrained):
        parser.error("give either --checkpoint (a train.py run) or --model with --pretrained (released weights)")
    return args


# ---------------------------------------------------------------- where the output goes


def out_problem(out: str, target: str, force: bool) -> str | None:
    """Why --out cannot be written, or None; checked before the model loads."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        return f"--out {shown(out)}: the folder {shown(parent)} does not exist"
    if not os.path.lexists(out):
        return None
    if target == "open_clip":
        if os.path.isdir(out) or not os.path.isfile(out):
            return f"--out {shown(out)}: --to open_clip writes a file, and this is a folder or not a regular file"
        return None if force else f"--out {shown(out)}: the file exists (--force replaces it)"
    if not os.path.isdir(out) or os.path.islink(out):
        return f"--out {shown(out)}: --to {target} writes a folder, and this is a file or a link"
    entries = os.listdir(out)
    others = [name for name in entries if name not in EXPORT_FILES or not os.path.isfile(os.path.join(out, name))]
    if others:
        return (f"--out {shown(out)}: the folder holds files no export writes (e.g. {shown(others[0])}); not replaced, "
                f"even with --force")
    if entries and not force:
        return (f"--out {shown(out)}: the folder holds an earlier export ({', '.join(sorted(entries))}; --force "
                f"replaces it)")
    return None


def write_folder(out: str, fill) -> None:
    """fill(folder) into a temporary folder next to `out`, then renamed to `out` (an earlier export there is
    removed after the new one is in place)."""
    out = os.path.abspath(out)
    parent, name = os.path.dirname(out), os.path.basename(out)
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; the export gets a folder's usual mode
    try:
        fill(staging)
        if os.path.isdir(out) and os.listdir(out):  # a previous export (out_problem checked it holds nothing else)
            previous = tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=parent)
            os.replace(out, previous)  # onto the empty folder mkdtemp made
            os.replace(staging, out)
            shutil.rmtree(previous)
        else:
            os.replace(staging, out)  # a rename onto a missing or empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: str, value: dict) -> None:
    write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- open_clip


def export_open_clip(name: str, model: CLIP, tokenizer, out: str) -> list[str]:
    """The state dict in open_clip's layout at `out`, plus an open_clip model config where `name` is not this
    architecture in open_clip (our paper presets equal open_clip's configs: tests/test_convert.py)."""
    config = convert.openclip_model_config(model, tokenizer.eos_id)
    preset = None
    if name in MODELS and name not in TINY_MODELS:
        with torch.device("meta"):
            preset_model = create_model(name)
        preset = convert.openclip_model_config(preset_model, preset_model.text.vocab_size - 1)
    state_dict = convert.ours_to_openclip({key: value.detach().cpu() for key, value in model.state_dict().items()})
    write_atomic(out, lambda file: torch.save(state_dict, file), binary=True)
    if config == preset:
        return [f"wrote {shown(out)}: open_clip.create_model({name!r}, pretrained={shown(out)!r})"]
    stem = os.path.splitext(out)[0]
    write_json(stem + ".json", config)
    model_name = os.path.basename(stem)
    return [f"wrote {shown(out)} and {shown(stem)}.json ({name} differs from open_clip's preset of that name): "
            f"open_clip.add_model_config({shown(stem) + '.json'!r}); open_clip.create_model({model_name!r}, "
            f"pretrained={shown(out)!r})"]


# ---------------------------------------------------------------- HuggingFace


def clip_tokenizer_files(tokenizer: ClipTokenizer, folder: str) -> None:
    """vocab.json and merges.txt for transformers' CLIPTokenizer, from the same merges as ours: the 256 byte
    symbols (GPT-2's byte-to-unicode map), the same with the end-of-word mark </w>, one entry per merge, then
    <|startoftext|> and <|endoftext|>, the ids of ours. HF pads with <|endoftext|> where ours pads with 0 (a pad
    token "!" would become an added token, split out of words before BPE): CLIPModel pools at the first
    end-of-text token, so the features are the same."""
    lines = gzip.decompress(tokenizer.model_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_MERGES + 1]  # line 0 is the file's header
    symbols = [symbol for _, symbol in byte_symbols()]
    pieces = [*symbols, *(symbol + "</w>" for symbol in symbols), *(merge.replace(" ", "") for merge in merges)]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    if len(vocab) != tokenizer.vocab_size or vocab["<|endoftext|>"] != tokenizer.eos_id:
        raise BadInput(f"the CLIP vocabulary rebuilt from the run's BPE file has {len(vocab)} ids, the tokenizer "
                       f"{tokenizer.vocab_size}")
    write_json(os.path.join(folder, "vocab.json"), vocab)
    write_atomic(os.path.join(folder, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.context_length, "do_lower_case": True,
        "errors": "replace", **special})


def bert_tokenizer_files(tokenizer: BertTokenizer, folder: str) -> None:
    """vocab.txt (the run's bytes) and tokenizer_config.json for transformers' BertTokenizer, with BLIP's [DEC]
    (bos) and [ENC] added after the vocabulary at the ids ours gives them (BLIP's `init_tokenizer`)."""
    write_atomic(os.path.join(folder, "vocab.txt"), tokenizer.model_bytes())

    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    special = {"bos_token": "[DEC]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
               "unk_token": "[UNK]", "mask_token": "[MASK]", "additional_special_tokens": ["[ENC]"]}
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
        "added_tokens_decoder": {str(tokenizer.dec_id): added("[DEC]"), str(tokenizer.enc_id): added("[ENC]")},
        **special})


def write_safetensors(path: str, state_dict: dict) -> None:
    tensors = {key: value.detach().cpu() for key, value in state_dict.items()}
    write_atomic(path, lambda file: convert.write_safetensors(file, tensors, {"format": "pt"}), binary=True)


def export_hf(model: nn.Module, tokenizer, out: str) -> list[str]:
    notes = []
    if isinstance(model, CLIP):
        visual = model.visual
        if not hasattr(visual, "patch_embed"):
            raise BadInput("transformers' CLIPModel has no ResNet image tower (its CLIP is ViT only); export this "
                           "model --to open_clip or --to onnx")
        if not isinstance(visual.patch_embed, PatchEmbed) or visual.patch_embed.proj.bias is not None:
            raise BadInput("transformers' CLIPModel embeds patches with one bias-free convolution; this model's "
                           "image tower has a convolutional stem (model.vit_stem=conv)")
        state_dict = convert.ours_to_hf_clip({key: value for key, value in model.state_dict().items()
                                              if key != "logit_bias"})
        config = convert.hf_clip_config(model, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
        tokenizer_files = clip_tokenizer_files if isinstance(tokenizer, ClipTokenizer) else None
        loads = "CLIPModel.from_pretrained"
        if model.logit_bias is not None:
            notes.append(f"note: CLIPModel has no logit bias; this SigLIP model's ({model.logit_bias.item():.4g}) is "
                         f"not in the folder (features are unaffected)")
    else:
        visual = model.visual_encoder
        if not hasattr(visual, "patch_embed") or model.stage_tokens is not None:
            raise BadInput("transformers' BLIP has a ViT image tower only; this BLIP's is a ResNet")
        if not isinstance(visual.patch_embed, PatchEmbed):
            raise BadInput("transformers' BLIP embeds patches with one convolution; this model's image tower has a "
                           "convolutional stem (model.vit_stem=conv)")
        state_dict = convert.ours_to_blip_hf(model.state_dict())
        config = convert.hf_blip_config(model)
        tokenizer_files = bert_tokenizer_files if isinstance(tokenizer, BertTokenizer) else None
        classes = [name for name, part in (("BlipForConditionalGeneration", model.text_decoder),
                                           ("BlipForImageTextRetrieval", model.text_encoder)) if part is not None]
        loads = " and ".join(f"{name}.from_pretrained" for name in classes)

    def fill(folder: str) -> None:
        write_json(os.path.join(folder, "config.json"), config)
        write_safetensors(os.path.join(folder, "model.safetensors"), state_dict)
        if tokenizer_files is not None:
            tokenizer_files(tokenizer, folder)

    write_folder(out, fill)
    if tokenizer_files is None:
        notes.append(f"note: no tokenizer files: transformers has no tokenizer of this run's "
                     f"({type(tokenizer).__name__})")
    return [f"wrote {shown(out)}: {loads}({shown(out)!r})", *notes]


# ---------------------------------------------------------------- ONNX


class ImageEncoder(nn.Module):
    """(B, 3, H, W) float32 -> (B, embed_dim): `CLIP.encode_image`, not normalised."""

    def __init__(self, clip: CLIP):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)


class TextEncoder(nn.Module):
    """(B, T) int64 -> (B, embed_dim): `TextTransformer.forward` without its cut of the batch's padding columns
    (a host-side length that would fix the exported graph to the example's; the cut changes nothing, causal
    attention keeps every pooled token from seeing the pads)."""

    def __init__(self, clip: CLIP):
        super().__init__()
        self.text = clip.text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.text.forward_features(tokens)  # (B, T, width)
        last = text_lengths(tokens, self.text.pad_id) - 1  # (B,) the end-of-text position
        return x[torch.arange(x.shape[0], device=x.device), last] @ self.text.proj  # (B, embed_dim)


def onnx_export(module: nn.Module, example: torch.Tensor, path: str, input_name: str, output_name: str) -> None:
    big = sum(tensor.numel() * tensor.element_size() for tensor in module.state_dict().values()) > ONNX_INLINE_LIMIT
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(module, (example,), path, input_names=[input_name], output_names=[output_name],
                          dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, dynamo=True, external_data=big,
                          verbose=False)


def export_onnx(model: CLIP, tokenizer, out: str) -> list[str]:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise BadInput(f"--to onnx needs {' and '.join(missing)}: pip install 'crossmodal[export]'")
    size, context_length = model.visual.image_size, model.text.context_length
    images = torch.randn(2, 3, size, size)
    tokens = torch.full((2, context_length), tokenizer.pad_id, dtype=torch.long)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = tokenizer.bos_id, 1 % model.text.vocab_size, tokenizer.eos_id
    tokens[1, 2], tokens[1, 3] = 2 % model.text.vocab_size, tokenizer.eos_id  # rows of different lengths

    def fill(folder: str) -> None:
        with torch.no_grad():
            onnx_export(ImageEncoder(model), images, os.path.join(folder, "image_encoder.onnx"), "images",
                        "image_features")
            onnx_export(TextEncoder(model), tokens, os.path.join(folder, "text_encoder.onnx"), "tokens",
                        "text_features")

    write_folder(out, fill)
    return [f"wrote {shown(out)}: image_encoder.onnx (images (B, 3, {size}, {size}) float32) and text_encoder.onnx "
            f"(tokens (B, {context_length}) int64), features (B, {model.embed_dim}) not normalised"]


# ---------------------------------------------------------------- the command


def load(args):
    """(config, model, tokenizer) of --checkpoint or --model/--pretrained, as eval.py loads them."""
    if args.checkpoint:
        return load_run(args.checkpoint)
    return load_released(args.model, args.pretrained, bpe=args.bpe, vocab=args.vocab)


def target_problem(model: nn.Module, name: str, target: str) -> str | None:
    """Why `model` (of preset `name`) cannot go --to `target`, or None."""
    if isinstance(model, BLIP):
        if target != "hf":
            return (f"{name} is a BLIP model: --to {target} exports CLIP models (open_clip and ONNX have no BLIP); "
                    f"use --to hf")
        return None
    if not isinstance(model, CLIP):
        return f"{name} ({type(model).__name__}) cannot be exported: export knows CLIP (and SigLIP) and BLIP models"
    return None


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    problem = out_problem(args.out, args.to, args.force)
    if problem:
        fail(f"export: {problem}")
    try:
        cfg, model, tokenizer = load(args)
        problem = target_problem(model, cfg.model.name, args.to)
        if problem:
            raise BadInput(problem)
        model = model.float().eval()
        with torch.no_grad():
            if args.to == "open_clip":
                lines = export_open_clip(cfg.model.name, model, tokenizer, args.out)
            elif args.to == "hf":
                lines = export_hf(model, tokenizer, args.out)
            else:
                lines = export_onnx(model, tokenizer, args.out)
    except (FileNotFoundError, ValueError) as error:  # bad input (a config.BadInput too): one line, no traceback
        fail(f"export: {error}")
    for line in lines:
        print(line)
    return lines


if __name__ == "__main__":
    main()
