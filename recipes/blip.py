"""BLIP (Li et al., ICML 2022): image-text contrastive (ITC) with momentum distillation and a feature queue,
image-text matching (ITM) with hard negatives, and the image-grounded captioning decoder (LM), from one model.

blip.losses picks the objectives (retrieval finetuning: itc,itm; captioning: lm); blip.qa_fraction
gives that share of images (data with questions) "question: q answer: a" decoder rows, and blip.prompt a
prompt before every caption (the decoder rows data.Collate builds when this recipe asks).
"""
import os
import zlib

import torch

from crossmodal.config import Config
from crossmodal.data import build_dataset
from crossmodal.data.tokenizer import BertTokenizer
from crossmodal.evaluation import blip as blip_evaluation
from crossmodal.models import (BLIP_MODELS, BLIP_TEXT_LENGTH, convert_sync_batchnorm, create_model, is_run_checkpoint,
                               load_blip_vision, load_run_weights, released_folder_problem)
from crossmodal.models.blip import OBJECTIVES, token_stride_problem
from crossmodal.recipes.base import Recipe, check_unused
from crossmodal.recipes.clip import check_no_decoder_data, contrastive_task

TASK_PARTS = {"retrieval": ("text_encoder", "text_proj", "vision_proj", "itm_head"), "caption": ("text_decoder",),
              "vqa": ("text_decoder",), "zeroshot": ("text_encoder", "text_proj", "vision_proj"),
              "linear_probe": ("vision_proj",), "binding": ("text_encoder", "text_proj", "vision_proj")}


class BlipRecipe(Recipe):
    """BLIP pretraining and finetuning (ITC, ITM, LM) of a BLIP preset."""

    tasks = ("retrieval", "caption", "vqa", "zeroshot", "linear_probe", "binding")
    tokenizers = ("sentencepiece", "bert")  # CLIP's BPE has no [DEC] and [ENC]
    sentencepiece_tokens = {"blip_tokens": True}  # [DEC], [ENC]
    sharded = False  # momentum encoders

    def objectives(self) -> list[str]:
        return self.cfg.blip.losses.split(",")

    def inputs(self) -> tuple[int, int]:
        return BLIP_MODELS[self.cfg.model.name].image_size, BLIP_TEXT_LENGTH

    def check(self, world_size: int) -> str | None:
        cfg, objectives = self.cfg, self.objectives()
        if cfg.train.accum_steps != 1:
            return ("train.accum_steps must be 1 for BLIP: every forward updates the momentum encoders and the "
                    "feature queue, so micro-batches cannot be cached and re-run as CLIP's exact accumulation does")
        for key in ("itm_uniform", "qa_fraction", "momentum"):
            if not 0 <= getattr(cfg.blip, key) <= 1:
                return f"blip.{key} must lie in [0, 1]; got {getattr(cfg.blip, key)}"
        if cfg.blip.qa_fraction and not cfg.data.train.startswith(("shapes:", "vqa:")):
            return (f"blip.qa_fraction needs training data with questions and answers (shapes, vqa); "
                    f"data.train is '{cfg.data.train}'")
        if not objectives or not set(objectives) <= set(OBJECTIVES) or len(set(objectives)) < len(objectives):
            return (f"blip.losses must list some of {','.join(OBJECTIVES)}, comma-separated; got "
                    f"'{cfg.blip.losses}'")
        if "itm" in objectives and "itc" not in objectives:
            return "blip.losses: itm samples its hard negatives from ITC's similarities; add itc"
        if cfg.blip.swap_negatives and ("itm" not in objectives or not cfg.data.train.startswith("shapes:")):
            return (f"blip.swap_negatives trains ITM on captions with attributes exchanged between a scene's objects: "
                    f"it needs itm in blip.losses and shapes training data; got blip.losses={cfg.blip.losses}, "
                    f"data.train={cfg.data.train}")
        problem = token_stride_problem(cfg.blip.token_stride, BLIP_MODELS[cfg.model.name].vision_tower)
        if problem:
            return f"blip.{problem} ({cfg.model.name})"
        preset_queue = BLIP_MODELS[cfg.model.name].queue_size
        if "itc" in objectives and (cfg.blip.queue_size < -1 or self.queue_size() % cfg.train.batch_size):
            return (f"blip.queue_size must be 0 (no queue), a multiple of the global batch "
                    f"train.batch_size={cfg.train.batch_size}, or -1 (the preset's {preset_queue}); "
                    f"got {cfg.blip.queue_size}")
        if cfg.data.train.startswith("vqa:") and (cfg.blip.qa_fraction != 1 or objectives != ["lm"]):
            return ("data.train: a vqa spec holds questions without captions: train it with blip.losses=lm "
                    "and blip.qa_fraction=1 (the decoder learns the answers)")
        if cfg.model.vision_checkpoint and not is_run_checkpoint(cfg.model.vision_checkpoint):
            return (f"model.vision_checkpoint: no train.py checkpoint at '{cfg.model.vision_checkpoint}' (a BLIP's "
                    f"image tower starts from a CLIP run of the same tower; for BLIP-RN-tiny run "
                    f"configs/clip/tiny_shapes.yaml first)")
        if cfg.model.pretrained:  # a HuggingFace folder must hold the preset's architecture
            problem = released_folder_problem("model.pretrained", cfg.model.pretrained, cfg.model.name)
            if problem:
                return problem
        problem = check_unused(self.cfg, "blip")
        if problem or cfg.data.train.startswith("vqa:"):
            return problem
        return check_no_decoder_data(cfg)

    def queue_size(self) -> int:
        size = self.cfg.blip.queue_size
        return BLIP_MODELS[self.cfg.model.name].queue_size if size == -1 else size

    def plan(self) -> None:
        """BLIP ramps alpha over its first two epochs (blip.alpha_steps left at 0)."""
        cfg = self.cfg
        if cfg.blip.alpha_steps:
            return
        if cfg.data.train.startswith("wds:"):
            cfg.blip.alpha_steps = max(1, cfg.train.steps // 10)  # a stream has no epoch length
        else:
            size = len(build_dataset(cfg.data.train, cfg.data.image_size, cfg.seed, cfg.data))
            cfg.blip.alpha_steps = max(1, 2 * size // cfg.train.batch_size)

    def caption_options(self) -> dict:
        return {"questions": self.cfg.blip.qa_fraction > 0}  # the VQA rows' text too

    def build_model(self, tokenizer, pretrained: bool = True) -> torch.nn.Module:
        """With its momentum encoders and queue when training runs ITC or ITM; a resumed run, or one from
        model.pretrained, has its image tower in those weights, else model.vision_checkpoint's."""
        cfg = self.cfg
        start = cfg.model.pretrained if pretrained else ""
        run_start = bool(start) and is_run_checkpoint(start)
        objectives = tuple(self.objectives())
        momentum = "itc" in objectives or "itm" in objectives
        vision_start = cfg.model.vision_checkpoint if pretrained and not start else ""
        model = create_model(cfg.model.name, pretrained=None if run_start else start or None,
                             image_size=cfg.data.image_size, drop_path=cfg.model.drop_path,
                             grad_checkpointing=cfg.model.grad_checkpointing, tokenizer=tokenizer,
                             momentum_encoders=False, momentum=cfg.blip.momentum,
                             queue_size=self.queue_size(), itm_uniform=cfg.blip.itm_uniform,
                             vision_stem=cfg.model.vit_stem, text_drop=cfg.blip.text_drop,
                             token_stride=cfg.blip.token_stride)
        model.objectives = objectives
        if run_start:
            load_run_weights(model, start)
        if vision_start:
            load_blip_vision(model, vision_start)
        if cfg.model.sync_bn:  # a ResNet tower (BLIP-RN-tiny); before locking, as new modules' parameters train
            convert_sync_batchnorm(model)
        if cfg.blip.lock_vision:
            model.lock_vision()
        if momentum:  # copies of the final online weights
            model.add_momentum_encoders(cfg.blip.momentum, self.queue_size())
        return model

    def prepare(self, model) -> None:
        model.temp.requires_grad_(self.cfg.train.learn_temperature)

    def ddp_options(self) -> dict:
        """The feature queue is the same on every rank by construction: no buffers to broadcast; a subset of the
        objectives leaves parts without gradients (e.g. no ITM head when captioning)."""
        return {"forward_sync_buffers": False, "find_unused_parameters": set(self.objectives()) != set(OBJECTIVES)}

    def loader_options(self) -> dict:
        return {"qa_fraction": self.cfg.blip.qa_fraction, "prompt": self.cfg.blip.prompt,
                "negatives": self.cfg.blip.swap_negatives}

    def alpha(self, step: int) -> float:
        """BLIP's momentum-distillation weight, ramped linearly from 0 over blip.alpha_steps."""
        return self.cfg.blip.alpha * min(1.0, step / max(1, self.cfg.blip.alpha_steps))

    def train_step(self, model, micro_batches, step, device, autocast, scaler) -> dict[str, torch.Tensor]:
        (batch,) = micro_batches  # check: BLIP trains without accumulation
        extra = {}  # the decoder's own rows (blip.qa_fraction, blip.prompt) and swapped captions (data.Collate)
        if "decoder_tokens" in batch:
            extra = {"decoder_tokens": batch["decoder_tokens"].to(device), "prompt_length": batch["prompt_lengths"]}
        tokens = batch["tokens"].to(device, non_blocking=True) if "tokens" in batch else None  # vqa: questions only
        if "negative_tokens" in batch:  # blip.swap_negatives: more ITM negatives, the images' own swapped captions
            keep = batch["has_negative"].nonzero()[:, 0]
            extra["swapped"] = (keep.to(device), batch["negative_tokens"][keep].to(device))
        itm_uniform = self.cfg.blip.itm_uniform * max(0.0, 1 - step / self.cfg.train.steps)
        with autocast:
            losses = model(batch["image"].to(device, non_blocking=True), tokens, image_ids=image_ids(batch["key"]).to(
                device), alpha=self.alpha(step), itm_uniform=itm_uniform, **extra)
        scaler.scale(sum(losses.values())).backward()
        return {name: value.detach() for name, value in losses.items()}

    def before_step(self, model, step: int) -> dict[str, float]:
        """BLIP clamps its temperature at the start of each forward, as BLIP does; this is what the loss uses."""
        return {"logit_scale": (1 / model.temp.detach().clamp(0.001, 0.5)).item()}

    def evaluate(self, model, tokenizer, device, writer=None, step: int = 0) -> dict:
        results = blip_evaluation.evaluate_run(self.cfg, model, tokenizer, device)
        if writer is not None:  # what the captioner says and answers, not only its scores
            picture, table = blip_evaluation.blip_examples(self.cfg, model, tokenizer, device)
            writer.add_image("val/examples", picture, step, dataformats="HWC")
            writer.add_text("val/examples", table, step)
        return results

    def check_task(self, task: str, model) -> str | None:
        missing = [part for part in TASK_PARTS[task] if getattr(model, part) is None]
        if missing:
            return (f"this BLIP checkpoint cannot do --task {task}: it has no {', '.join(missing)} (released task "
                    f"checkpoints hold only their task's parts)")
        return None

    def run_task(self, task: str, model, tokenizer, spec: str, args) -> dict:
        cfg = self.cfg
        size, device = cfg.data.image_size, args.device
        loading = dict(batch_size=args.batch_size, workers=args.workers, options=cfg.data)
        if task == "caption":
            return blip_evaluation.caption(model, spec, size, device, **loading, num_beams=args.num_beams,
                                           max_length=args.max_length, min_length=args.min_length, prompt=args.prompt,
                                           log_every=args.log_every)
        if task == "vqa":
            answers = blip_evaluation.load_answer_list(args.answers) if args.answers else None
            return blip_evaluation.vqa(model, tokenizer, spec, size, device, **loading, mode=args.vqa_mode,
                                       answers=answers, answer_k=args.answer_k, num_beams=args.num_beams,
                                       log_every=args.log_every)
        if task == "retrieval":
            return blip_evaluation.blip_retrieval(model, tokenizer, spec, size, device, **loading, k_test=args.k_test,
                                                  log_every=args.log_every)
        return contrastive_task(cfg, task, model, tokenizer, spec, args)  # through the ITC features

    @classmethod
    def load_released(cls, name: str, pretrained: str, vocab: str | None = None, **unused):
        """(config, model, tokenizer): salesforce/BLIP `.pth` files or HuggingFace BLIP folders, with BERT's
        WordPiece (+ [DEC], [ENC]) from --vocab or the vocab.txt in or next to the weights."""
        tokenizer = BertTokenizer(find_vocab(vocab, pretrained), context_length=BLIP_TEXT_LENGTH)
        model = create_model(name, pretrained=pretrained, tokenizer=tokenizer)
        cfg = Config()
        cfg.model.name = name
        cfg.data.image_size, cfg.data.context_length = model.visual_encoder.image_size, BLIP_TEXT_LENGTH
        cfg.data.tokenizer, cfg.eval.templates = "bert", "imagenet"
        return cfg, model, tokenizer


def image_ids(keys: list[str]) -> torch.Tensor:
    """An id per sample's image (its path; a shapes index): BLIP counts every caption of an image as a positive."""
    return torch.tensor([zlib.crc32(key.encode()) & 0x7FFFFFFF for key in keys])


def find_vocab(vocab: str | None, pretrained: str) -> str:
    """--vocab, else the vocab.txt of a HuggingFace folder or next to a weights file."""
    if vocab:
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"--vocab: no BERT vocabulary at '{vocab}'")
        return vocab
    folder = pretrained if os.path.isdir(pretrained) else os.path.dirname(os.path.abspath(pretrained))
    candidate = os.path.join(folder, "vocab.txt")
    if os.path.isfile(candidate):
        return candidate
    raise FileNotFoundError(f"no BERT vocabulary found (looked for {candidate}); pass --vocab PATH/vocab.txt "
                            f"(bert-base-uncased's, which BLIP uses)")
