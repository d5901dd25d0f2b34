"""LLaVA (Liu et al., NeurIPS 2023; LLaVA-1.5, 2023; models/llava.py): a frozen CLIP image tower's tokens,
projected into a language model's embedding space, in the prompt of the conversation template (data/conversation.py).

Two stages, as LLaVA trains:
- stage 1, feature alignment (`llava.train=projector`): only the projector trains, on image-caption pairs as
  "USER: <image> {llava.prompt} ASSISTANT: {caption}"; the run starts from a CLIP run (model.vision_checkpoint,
  its image tower) and a language-model run (llava.lm_checkpoint, whose tokenizer it takes);
- stage 2, visual instruction tuning (`llava.train=projector,lm`): the projector and the LM train on instruction
  rows, a share llava.qa_fraction of the images asking their question (data with questions: shapes, vqa), the
  rest asking for the description; the run starts from stage 1 (model.pretrained, its checkpoint.pt).
The loss is on the reply's tokens and the end token only. The tower stays frozen in eval mode throughout
(LLaVA-1.5 never trains it; a ResNet's BatchNorm statistics stay the CLIP run's).

Presets: `models.llava.LLAVA_RUN_MODELS` (the CPU demo's LLaVA-RN-tiny: the CLIP demo's RN-tiny and the LM demo's
lm-tiny). The released architectures (LLaVA-1.5-7b, ...) load through `create_model(name, pretrained=FOLDER)`;
train.py does not train them (their tokenizer is LLaMA's, with llava-hf's added tokens).
"""
import os
import zlib

import torch

from crossmodal import checkpointing
from crossmodal.data import build_dataset, has_questions
from crossmodal.data.conversation import conversation_rows
from crossmodal.data.tokenizer import tokenizer_from_bytes
from crossmodal.evaluation import llava as llava_evaluation
from crossmodal.evaluation.generation import load_answer_list
from crossmodal.losses import lm_labels, lm_loss
from crossmodal.models import (LLAVA_RUN_MODELS, MODELS, create_llava_run, is_run_checkpoint, load_run_weights,
                               released_folder_problem)
from crossmodal.models.llava import FEATURE_STRATEGIES
from crossmodal.recipes.base import Recipe, check_unused, mean_step
from crossmodal.recipes.clip import check_no_decoder_data
from crossmodal.recipes.registry import RESNET_STRIDE

PARTS = ("projector", "projector,lm")  # llava.train: stage 1, stage 2
CONTEXT_LENGTH = 64  # besides the image tokens: the template, a question or the instruction, and the reply


class LlavaRecipe(Recipe):
    """LLaVA's two stages on a LLAVA_RUN_MODELS preset (see the module docstring)."""

    tasks = ("vqa", "caption")
    tokenizers = ("sentencepiece",)
    sentencepiece_tokens = {"flamingo_tokens": True}  # <image> (and <|endofchunk|>), as the LM demo's tokenizer has
    sharded = False

    def inputs(self) -> tuple[int, int]:
        """The tower's image size; room for its image tokens and CONTEXT_LENGTH more."""
        preset = LLAVA_RUN_MODELS.get(self.cfg.model.name)
        if preset is None:  # a released architecture (refused by check)
            return 336, CONTEXT_LENGTH
        tower = MODELS[preset["tower"]]
        cells = (tower.image_size // (tower.patch_size or RESNET_STRIDE)) ** 2
        return tower.image_size, cells + 1 + CONTEXT_LENGTH

    def check(self, world_size: int) -> str | None:
        cfg, llava = self.cfg, self.cfg.llava
        if cfg.model.name not in LLAVA_RUN_MODELS:
            return (f"model.name={cfg.model.name}: train.py trains LLaVA on this codebase's own runs "
                    f"({', '.join(LLAVA_RUN_MODELS)}); released LLaVA folders load through create_model")
        if llava.train not in PARTS:
            return f"llava.train must be one of {', '.join(PARTS)}; got '{llava.train}'"
        if llava.select and llava.select not in FEATURE_STRATEGIES:
            return (f"llava.select must be one of {', '.join(FEATURE_STRATEGIES)} or '' (the preset's); got "
                    f"'{llava.select}'")
        if cfg.model.pretrained:
            if not is_run_checkpoint(cfg.model.pretrained):
                return (f"model.pretrained '{cfg.model.pretrained}': a LLaVA run starts from another LLaVA run's "
                        f"checkpoint.pt (stage 2 from stage 1)")
            if checkpointing.read_run(cfg.model.pretrained)["config"]["model"]["name"] != cfg.model.name:
                return f"model.pretrained '{cfg.model.pretrained}' is not a {cfg.model.name} run"
        else:
            for key, path in (("model.vision_checkpoint", cfg.model.vision_checkpoint),
                              ("llava.lm_checkpoint", llava.lm_checkpoint)):
                if not path:
                    return (f"{key} is empty: a new {cfg.model.name} starts from a CLIP run (model.vision_checkpoint) "
                            f"and a language-model run (llava.lm_checkpoint), or from a LLaVA run (model.pretrained)")
            if not is_run_checkpoint(cfg.model.vision_checkpoint):
                return (f"model.vision_checkpoint: no train.py checkpoint at '{cfg.model.vision_checkpoint}' (a CLIP "
                        f"run)")
            lm = llava.lm_checkpoint
            if not is_run_checkpoint(lm):
                problem = released_folder_problem("llava.lm_checkpoint", lm, LLAVA_RUN_MODELS[cfg.model.name]["lm"])
                if problem or not os.path.isdir(lm):
                    return problem or f"llava.lm_checkpoint: no train.py checkpoint or HuggingFace folder at '{lm}'"
        if llava.qa_fraction and not cfg.data.train.startswith(("shapes:", "vqa:")):
            return (f"llava.qa_fraction needs training data with questions and answers (shapes, vqa); data.train is "
                    f"'{cfg.data.train}'")
        if cfg.data.train.startswith("vqa:") and llava.qa_fraction != 1:
            return "data.train: a vqa spec holds questions without captions: train it with llava.qa_fraction=1"
        problem = check_unused(cfg, "llava")
        if problem or cfg.data.train.startswith("vqa:"):
            return problem
        return check_no_decoder_data(cfg)

    def build_tokenizer(self, out_dir: str, checkpoint: dict | None = None):
        """A new run takes its language-model run's tokenizer: the LM's embeddings are only meaningful with it."""
        lm = self.cfg.llava.lm_checkpoint
        if checkpoint is None and not self.cfg.model.pretrained and not self.cfg.data.tokenizer_path and lm:
            start = checkpointing.read_run(lm)
            if start is not None and "tokenizer" in start:
                return tokenizer_from_bytes(self.cfg.data.tokenizer, start["tokenizer"], self.cfg.data.context_length)
        return super().build_tokenizer(out_dir, checkpoint)

    def build_model(self, tokenizer, pretrained: bool = True) -> torch.nn.Module:
        """With `pretrained`: a LLaVA run's weights (model.pretrained), else the CLIP run's tower and the LM."""
        cfg = self.cfg
        self.tokenizer = tokenizer  # train_step writes the conversation rows with it
        start = cfg.model.pretrained if pretrained else ""
        new = pretrained and not start
        model = create_llava_run(cfg.model.name, tokenizer, cfg.data.image_size, cfg.data.context_length,
                                 lm_checkpoint=cfg.llava.lm_checkpoint if new else "",
                                 vision_checkpoint=cfg.model.vision_checkpoint if new else "",
                                 select=cfg.llava.select)
        if start:
            load_run_weights(model, start)
        return model

    def prepare(self, model) -> None:
        """The tower frozen, the LM frozen in stage 1, the projector trained."""
        model.lock_vision()
        model.language_model.requires_grad_("lm" in self.cfg.llava.train.split(","))

    def train_step(self, model, micro_batches, step, device, autocast, scaler) -> dict[str, torch.Tensor]:
        raw = getattr(model, "module", model)  # DDP's wrapped LLaVA: its feature count and token ids

        def losses(batch):
            tokens, prompt_lengths = self.rows(raw, batch)
            tokens = tokens.to(device, non_blocking=True)
            logits = model(batch["image"].to(device, non_blocking=True), tokens)  # (B, T, vocab)
            labels = lm_labels(tokens, raw.pad_id, prompt_lengths)  # the reply and its end token only
            return {"lm": lm_loss(logits, labels, label_smoothing=0.0)}

        return mean_step(model, micro_batches, losses, autocast, scaler)

    def rows(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's conversation: its question and answer for a share llava.qa_fraction of the images (chosen
        by a hash of the key, so any world size and a resumed run choose the same; all at 1), else the description
        instruction and its caption."""
        llava, keys = self.cfg.llava, batch["key"]
        asks = [bool("question" in batch and (llava.qa_fraction >= 1 or
                zlib.crc32(f"llava/{key}".encode()) % 10_000 < llava.qa_fraction * 10_000)) for key in keys]
        instructions = [batch["question"][i] if ask else llava.prompt for i, ask in enumerate(asks)]
        replies = [batch["answer"][i] if ask else batch["caption"][i] for i, ask in enumerate(asks)]
        return conversation_rows(self.tokenizer, instructions, replies, model.features_per_image,
                                 model.image_token_id, self.cfg.data.context_length)

    def evaluate(self, model, tokenizer, device, writer=None, step: int = 0) -> dict:
        """On data.val (and data.heldout): VQA accuracy (rank mode, the data's own answers as candidates) when it
        has questions, caption scores when it has captions."""
        cfg, results = self.cfg, {}
        for split, spec in (("val", cfg.data.val), ("heldout", cfg.data.heldout)):
            if not spec:
                continue
            dataset = build_dataset(spec, cfg.data.image_size, cfg.seed, cfg.data)
            if has_questions(dataset):
                answered = llava_evaluation.vqa(model, tokenizer, spec, cfg.data.image_size, device,
                                                cfg.eval.batch_size, options=cfg.data, log_every=0)
                results[f"{split}/vqa_accuracy"] = answered["accuracy"]
            if split == "val" and not spec.startswith("vqa:"):
                scores = llava_evaluation.caption(model, tokenizer, spec, cfg.data.image_size, device,
                                                  cfg.llava.prompt, cfg.eval.batch_size, options=cfg.data, log_every=0)
                results.update({f"val/{name}": scores[name] for name in ("BLEU-4", "CIDEr")})
        return results

    def run_task(self, task: str, model, tokenizer, spec: str, args) -> dict:
        cfg = self.cfg
        loading = dict(batch_size=args.batch_size, workers=args.workers, options=cfg.data, log_every=args.log_every)
        if task == "caption":  # --prompt is BLIP's decoder prefix; LLaVA is asked with its run's instruction
            return llava_evaluation.caption(model, tokenizer, spec, cfg.data.image_size, args.device, cfg.llava.prompt,
                                            num_beams=args.num_beams, max_new_tokens=args.max_length, **loading)
        answers = load_answer_list(args.answers) if args.answers else None
        return llava_evaluation.vqa(model, tokenizer, spec, cfg.data.image_size, args.device, mode=args.vqa_mode,
                                    answers=answers, answer_k=args.answer_k, num_beams=args.num_beams, **loading)
