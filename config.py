"""Run configuration: nested dataclasses with defaults in code, a YAML file that overrides them, and
dotted command-line overrides (`--train.lr=3e-4`). An unknown key, a value of the wrong type, a number out of its
range (`RANGES`: nan and inf included) or a YAML syntax error fails before anything runs, naming the key (and the
closest valid keys) or the file and line.
"""
import copy
import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field

import yaml

from crossmodal.files import shown, write_atomic


@dataclass
class ModelConfig:
    name: str = "ViT-tiny"  # a preset: the architecture, and through it the family (recipes/__init__.py)
    grad_checkpointing: bool = False
    drop_path: float = 0.0
    vit_stem: str = "patch"  # ViT image towers (CLIP, BLIP): patch (the papers') | conv (a convolutional stem, Xiao et al. 2021)
    sync_bn: bool = False  # BatchNorm statistics over all processes (the ResNet towers), so any world size trains one model
    init_temperature: float = 0.0  # softmax temperature at init; 0: the loss's default (clip 0.07, siglip 0.1)
    pretrained: str = ""  # weights to start from: released CLIP/BLIP files, or a train.py checkpoint.pt of the same model
    vision_checkpoint: str = ""  # the image tower's start, a CLIP run's checkpoint.pt: Flamingo's frozen tower ("": random); BLIP's (unless model.pretrained)


@dataclass
class BlipConfig:  # recipes/blip.py
    momentum: float = 0.995  # EMA rate of the momentum encoders
    queue_size: int = -1  # momentum features kept for ITC (a multiple of the global batch); -1: the preset's
    alpha: float = 0.4  # momentum-distillation weight, ramped from 0 over alpha_steps
    alpha_steps: int = 0  # 0: two epochs of data.train (BLIP's ramp), or train.steps // 10 for a stream
    itm_uniform: float = 0.0  # share of ITM negatives drawn uniformly at step 0, falling linearly to 0 (BLIP's) at the end
    qa_fraction: float = 0.0  # share of images (data with questions) whose decoder learns "question: q answer: a"
    losses: str = "itc,itm,lm"  # the objectives trained (retrieval finetuning: itc,itm; captioning: lm)
    prompt: str = ""  # text put before every caption for the decoder, not learned ("a picture of " to finetune)
    text_drop: float = 0.1  # the text stack's hidden and attention dropout (BERT's 0.1)
    lock_vision: bool = False  # the image tower frozen (LiT's locked tower; with model.vision_checkpoint)
    token_stride: int = 32  # a ResNet tower's image tokens after the pooled one: 32, the attention pool's grid; 16, the third stage's, 4x as many (models/blip.py, StageTokens)
    swap_negatives: bool = False  # ITM also learns each image against its caption with two objects' attributes exchanged (shapes data; NegCLIP's hard negatives)


@dataclass
class LMConfig:  # recipes/lm.py, language models
    induction_fraction: float = 0.0  # on interleaved text: this share of rows is a random token string written twice,
    # with loss on the repeat only (seeds induction heads; see data/interleaved.py)


@dataclass
class FlamingoConfig:  # recipes/lm.py, Flamingo
    lm_checkpoint: str = ""  # the frozen LM, a language-model run's checkpoint.pt or an MPT folder


@dataclass
class LlavaConfig:  # recipes/llava.py, LLaVA
    lm_checkpoint: str = ""  # the language model a new LLaVA starts from: a language-model run's checkpoint.pt or a LLaMA folder
    train: str = "projector"  # what trains: projector (stage 1, feature alignment) | projector,lm (stage 2, instruction tuning)
    qa_fraction: float = 0.0  # share of rows that are a question and its answer (data with questions); the rest describe the image
    prompt: str = "describe the image briefly."  # the user's turn of the rows that describe the image (LLaVA's brief-description instruction)
    select: str = ""  # the image tower's tokens: "" (the preset's) | default (the grid or patches) | full (the pooled or CLS token too)


@dataclass
class VideoConfig:  # recipes/video.py, clips (video specs: moving_shapes, video_csv, msrvtt)
    pool: str = "mean"  # how a clip's frame features become one: mean (CLIP4Clip's meanP) | transformer (seqTransf)
    frames: int = 8  # frames sampled uniformly from each clip (random offsets in training, fixed in evaluation)
    layers: int = 2  # the temporal Transformer's blocks (pool=transformer)
    temporal_lr_scale: float = 1.0  # the temporal Transformer's learning rate is train.lr times this (pool=transformer): it starts from zero while the tower starts trained
    order_weight: float = 0.0  # with reverse_negatives: weight of a loss over each clip and its reversal alone (each caption against the two clips, each clip against the two captions)
    reverse_negatives: bool = False  # each training clip also enters the batch reversed in time, with its reversal's caption (moving_shapes): order is what tells them apart


@dataclass
class DataConfig:
    train: str = "shapes:train"  # dataset spec strings, see data/__init__.py
    val: str = "shapes:val"
    heldout: str = "shapes:heldout"  # evaluated zero-shot at the end; "" to skip
    image_size: int = 0  # 0: the model preset's (64 for the tiny presets, 224 for ViT-B-32, ...)
    workers: int = 2  # DataLoader worker processes per training process
    tokenizer: str = "sentencepiece"  # sentencepiece | clip (CLIP's byte-level BPE, vocabulary 49408) | bert (WordPiece)
    tokenizer_path: str = ""  # sentencepiece: a model, or "" to train one on data.train captions; clip: the .txt.gz; bert: vocab.txt
    tokenizer_captions: int = 20000  # how many training captions the tokenizer is trained on
    vocab_size: int = 1024
    context_length: int = 0  # 0: the model preset's (32 for the tiny presets, 77 for the paper's)
    image_root: str = ""  # coco and csv: folder relative image paths start from; "" = the JSON's or CSV's folder
    csv_image_key: str = "filepath"  # csv: column of image paths
    csv_caption_key: str = "caption"  # csv: column of captions
    csv_separator: str = ""  # csv: field separator; "" = a tab if the header has one, else a comma
    shuffle_buffer: int = 1000  # wds: samples each reader shuffles among (as raw bytes: ~1000 x image size)
    jpeg_draft: bool = True  # training JPEGs decode at a DCT scale still >= image_size, same crop (docs/results.md)
    max_bad_fraction: float = 0.01  # stop if more than this fraction of samples seen is unreadable (>= 10 of them)


@dataclass
class LossConfig:
    name: str = "clip"  # clip (InfoNCE) | siglip (sigmoid)
    impl: str = "torch"  # torch | fused (kernels/ ops: the logits in blocks, never N x N; clip and siglip)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128  # global: summed over processes and accumulation steps
    accum_steps: int = 1  # gradient accumulation over micro-batches (exact for contrastive losses)
    lr: float = 5e-4
    min_lr: float = 0.0  # the cosine schedule ends here
    warmup_steps: int = 100
    weight_decay: float = 0.2  # not applied to norms, biases, embeddings, the logit scale
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    learn_temperature: bool = True  # false: the temperature (logit scale) stays at its initial value
    precision: str = "fp32"  # fp32 | bf16 (autocast, CPU or GPU) | fp16 (autocast + grad scaler, GPU)
    strategy: str = "ddp"  # ddp (every process holds the whole model) | fsdp (each holds a shard; see parallel.py)
    fsdp_cpu_offload: bool = False  # fsdp: shards, gradients and the optimizer step in CPU memory
    log_every: int = 10
    ckpt_every: int = 200
    eval_every: int = 0  # 0: evaluate only at the end


@dataclass
class EvalConfig:
    templates: str = "shapes"  # prompt-template set for zero-shot classification
    batch_size: int = 256


@dataclass
class FinetuneConfig:  # recipes/finetune.py
    strategy: str = ""  # "": contrastive pre-training; linear | full | gradual | llrd | lit | lora (recipes/finetune.py)
    init: str = ""  # a train.py checkpoint to start from (its model and tokenizer settings are adopted)
    pretrained: str = ""  # or released weights for model.name (OpenAI .pt, open_clip); data.tokenizer_path: the BPE
    unfreeze_every: int = 100  # gradual: steps between unfreezing the next layer group, from the top
    layer_decay: float = 0.75  # llrd: a layer group's lr is train.lr * layer_decay ** (depth - layer)
    patience: int = 0  # early stopping: evaluations (train.eval_every) without a better val top-1; 0: never stop
    wise_alpha: float = 1.0  # WiSE-FT: the final model is (1 - alpha) zero-shot + alpha fine-tuned weights
    wise_alphas: str = "0,0.25,0.5,0.75,1"  # WiSE-FT mixing weights evaluated at the end (wise.json)
    # lora (models/lora.py, recipes/lora.py): adapters of rank lora_rank scaled by lora_alpha / lora_rank
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # on the adapters' input
    lora_targets: str = ""  # module-name patterns, comma-separated ("": every attention projection)
    lora_base_dtype: str = "fp32"  # fp32 | bf16: the frozen base layers' storage (adapters stay fp32)
    lora_heads: str = ""  # with model.pretrained: parameter-name patterns trained with the adapters (e.g. logit_scale)


@dataclass
class Config:
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # the families' own sections (a family without settings of its own needs none)
    blip: BlipConfig = field(default_factory=BlipConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    flamingo: FlamingoConfig = field(default_factory=FlamingoConfig)
    llava: LlavaConfig = field(default_factory=LlavaConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# Keys that moved to a family's section: configs and checkpoints written before still load (a YAML file or the command
# line gets a one-line note naming the new place; a checkpoint's config is mapped silently).
RENAMED = {
    **{f"model.blip_{key}": f"blip.{key}" for key in ("momentum", "queue_size", "alpha", "alpha_steps", "itm_uniform",
                                                       "qa_fraction", "losses", "prompt", "text_drop", "lock_vision")},
    "model.lm_checkpoint": "flamingo.lm_checkpoint",
    "data.induction_fraction": "lm.induction_fraction",
}
_noted: set = set()  # old keys already noted in this process


@dataclass(frozen=True)
class Range:
    """The values a number in a config may take: `low` to `high`, an end left out when open. Always finite: no
    setting means anything at nan or inf, and nan would pass every comparison a safeguard makes with it."""

    low: float
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value) -> bool:
        return (math.isfinite(value) and (value > self.low if self.open_low else value >= self.low)
                and (value < self.high if self.open_high else value <= self.high))

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"


FRACTION, BELOW_ONE = Range(0, 1), Range(0, 1, open_high=True)
POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Range(0, open_low=True), Range(0), Range(1)

# Every int and float key and its range (tests/test_config.py holds this table to the dataclasses). Sentinels are
# in range where the fields above document them: 0 for the preset's size, no clipping, no early stopping; -1 for
# the preset's BLIP queue.
RANGES = {
    "seed": Range(0, 2**32 - 1),  # numpy's generators take non-negative seeds
    "model.drop_path": BELOW_ONE, "model.init_temperature": NON_NEGATIVE,
    "data.image_size": NON_NEGATIVE, "data.context_length": NON_NEGATIVE, "data.workers": NON_NEGATIVE,
    "data.tokenizer_captions": AT_LEAST_ONE, "data.vocab_size": Range(8), "data.shuffle_buffer": AT_LEAST_ONE,
    "data.max_bad_fraction": FRACTION,
    "train.steps": AT_LEAST_ONE, "train.batch_size": AT_LEAST_ONE, "train.accum_steps": AT_LEAST_ONE,
    "train.lr": POSITIVE, "train.min_lr": NON_NEGATIVE, "train.warmup_steps": NON_NEGATIVE,
    "train.weight_decay": NON_NEGATIVE, "train.beta1": BELOW_ONE, "train.beta2": BELOW_ONE, "train.eps": POSITIVE,
    "train.grad_clip": NON_NEGATIVE, "train.log_every": AT_LEAST_ONE, "train.ckpt_every": AT_LEAST_ONE,
    "train.eval_every": NON_NEGATIVE,
    "eval.batch_size": AT_LEAST_ONE,
    "blip.momentum": FRACTION, "blip.queue_size": Range(-1), "blip.alpha": FRACTION, "blip.alpha_steps": NON_NEGATIVE,
    "blip.itm_uniform": FRACTION, "blip.qa_fraction": FRACTION, "blip.text_drop": BELOW_ONE,
    "blip.token_stride": Range(16, 32),  # and 16 or 32: recipes/blip.py
    "lm.induction_fraction": BELOW_ONE,
    "llava.qa_fraction": FRACTION,
    "video.frames": AT_LEAST_ONE, "video.layers": AT_LEAST_ONE, "video.temporal_lr_scale": POSITIVE,
    "video.order_weight": NON_NEGATIVE,
    "finetune.unfreeze_every": AT_LEAST_ONE, "finetune.layer_decay": Range(0, 1, open_low=True),
    "finetune.patience": NON_NEGATIVE, "finetune.wise_alpha": FRACTION,
    "finetune.lora_rank": AT_LEAST_ONE, "finetune.lora_alpha": POSITIVE, "finetune.lora_dropout": BELOW_ONE,
}


class BadInput(ValueError):
    """A known problem with an input (a file, a value, a checkpoint, an index) that a library found: its message
    names the thing and what is wrong. Entry points turn it into one line and exit status 2 (`fail`)."""


class ConfigError(BadInput):
    pass


class Failure(SystemExit):
    """A known failure of a command-line entry point (bad file, bad value, wrong family): one line on stderr and
    exit status 2; a traceback means a bug. str() is the message (what tests match)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> None:
    """Print `message` as one line on stderr and stop with exit status 2."""
    print(message.replace("\n", " "), file=sys.stderr, flush=True)
    raise Failure(message)


def valid_keys(cls=Config, prefix: str = "") -> dict[str, type]:
    """Every dotted leaf key of a config dataclass and its type."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys.update(valid_keys(hints[f.name], name + "."))
        else:
            keys[name] = hints[f.name]
    return keys


def sections(cls=Config, prefix: str = "") -> set[str]:
    """Every dotted name of a section (a nested dataclass) of a config dataclass."""
    found = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found |= {prefix + f.name} | sections(hints[f.name], f"{prefix}{f.name}.")
    return found


def out_of_range(key: str, value) -> str | None:
    """What is wrong with a number for `key` (RANGES), or None."""
    allowed = RANGES.get(key)
    if allowed is None or value in allowed:
        return None
    if not math.isfinite(value):
        return f"{key} must be a finite number {allowed}; got {value}"
    return f"{key} must {'be' if allowed.high == math.inf else 'lie'} {allowed}; got {value}"


def check_values(cfg: Config) -> str | None:
    """The first number of `cfg` out of its range, or None (values set through load_config are checked as they
    are set; this is for configs changed in code)."""
    for key in RANGES:
        node = cfg
        for name in key.split("."):
            node = getattr(node, name)
        problem = out_of_range(key, node)
        if problem:
            return problem
    return None


def _unknown_key(key: str, source: str) -> ConfigError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in close]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(sorted(keys))}"
    return ConfigError(f"unknown config key '{key}' ({source}){hint}")


def _coerce(key: str, value, expected: type, source: str):
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # beyond any float: out of range as inf is
            return math.inf if value > 0 else -math.inf
    if expected is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads '3e-4' (no dot) as a string
        except ValueError:
            pass
    if type(value) is not expected:
        raise ConfigError(
            f"config key '{key}' ({source}) expects {expected.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _set(cfg: Config, key: str, value, source: str) -> None:
    if key in RENAMED:
        if source != "checkpoint" and key not in _noted:
            print(f"note: config key '{key}' ({source}) is now '{RENAMED[key]}'", file=sys.stderr, flush=True)
            _noted.add(key)
        key = RENAMED[key]
    keys = valid_keys()
    if key in sections():
        raise ConfigError(f"config key '{key}' ({source}) is a section: expected a mapping of its keys, got "
                          f"{type(value).__name__} {value!r}")
    if key not in keys:
        raise _unknown_key(key, source)
    *parents, leaf = key.split(".")
    node = cfg
    for name in parents:
        node = getattr(node, name)
    value = _coerce(key, value, keys[key], source)
    problem = out_of_range(key, value)
    if problem:
        raise ConfigError(f"{problem} ({source})")
    setattr(node, leaf, value)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value}. A mapping where a value belongs stays that key's value (a wrong type, said so), and
    nesting below two levels is not followed: no config key is that deep, and a YAML alias may refer to itself."""
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in sections() and value is None:
            continue  # a section whose keys are all commented out
        if isinstance(value, dict) and key not in valid_keys() and key.count(".") < 2:
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """['--train.lr=3e-4', '--seed', '1'] -> [('train.lr', '3e-4'), ('seed', '1')]."""
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected a --key=value override, got '{arg}'")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override '{arg}' has no value")
        pairs.append((key, value))
        i += 1
    return pairs


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then command-line overrides (values parsed as YAML scalars)."""
    cfg = Config()
    if path:
        tree = read_yaml(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{shown(path)}: expected a mapping of config keys at the top level, got "
                              f"{type(tree).__name__}")
        for key, value in _flatten(tree).items():
            _set(cfg, key, value, source=shown(path))
    return apply_overrides(cfg, overrides)


def read_yaml(path: str):
    """The YAML document in `path`, as plain data (safe_load runs no code), or a ConfigError naming the file and,
    for a syntax error, the line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as error:
        raise ConfigError(f"{shown(path)}: cannot read it ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{shown(path)}: not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        def at(mark) -> str:
            return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""

        problem = getattr(error, "problem", None) or " ".join(str(error).split())
        context = getattr(error, "context", None)
        if context:  # where the unfinished thing started, e.g. a '[' left open
            problem += f" ({context}{at(getattr(error, 'context_mark', None))})"
        raise ConfigError(f"{shown(path)}: not valid YAML{at(getattr(error, 'problem_mark', None))}: {problem}") from None


def apply_overrides(cfg: Config, overrides: list[str] = ()) -> Config:
    """A copy of `cfg` with command-line overrides applied (e.g. on top of a checkpoint's config)."""
    cfg = copy.deepcopy(cfg)
    for key, value in parse_overrides(list(overrides)):
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as error:
            if valid_keys().get(RENAMED.get(key, key)) is not str:
                raise ConfigError(f"--{key}={value}: not a YAML value ({getattr(error, 'problem', error)})") from None
            parsed = value  # '--data.image_root=[x' stays a string
        if valid_keys().get(RENAMED.get(key, key)) is str and not isinstance(parsed, str):
            parsed = value  # '--out_dir=2024' stays a string
        _set(cfg, key, parsed, source="command line")
    return cfg


def differences(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every leaf key whose value differs."""
    old_flat, new_flat = _flatten(dataclasses.asdict(old)), _flatten(dataclasses.asdict(new))
    return [(key, old_flat[key], new_flat[key]) for key in old_flat if old_flat[key] != new_flat[key]]


def config_from_dict(tree: dict) -> Config:
    cfg = Config()
    for key, value in _flatten(tree).items():
        _set(cfg, key, value, source="checkpoint")
    return cfg


def save_config(cfg: Config, path: str) -> None:
    write_atomic(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
