"""The decoder language models (MPT-style, models/lm.py; LLaMA-style, models/llama.py) and Flamingo (Alayrac et
al., 2022; models/flamingo.py): next-token prediction on interleaved image-text sequences (shapes_icl,
interleaved, interleaved_wds).

A language model reads their text alone (each image as its text); a Flamingo freezes its vision encoder
(model.vision_checkpoint, a CLIP run) and language model (flamingo.lm_checkpoint, a language-model run or an MPT
folder) and trains the Perceiver resampler, the gated cross-attention blocks and two token-embedding rows.
"""
import os

import torch

from crossmodal.config import Config
from crossmodal.data import INTERLEAVED, is_video_spec
from crossmodal.data.tokenizer import PAD_ID, GPTNeoXTokenizer
from crossmodal.evaluation import fewshot
from crossmodal.losses import lm_labels, lm_loss
from crossmodal.models import (FLAMINGO_MODELS, LLAMA_MODELS, LM_MODELS, MODELS, create_flamingo, create_lm,
                               create_model, is_run_checkpoint, load_run_weights, released_folder_problem)
from crossmodal.models.flamingo import freeze_for_training
from crossmodal.recipes.base import Recipe, check_unused, mean_step


class LanguageModelRecipe(Recipe):
    """A decoder LM trained on the text of interleaved specs (pads and induction rows' first halves unscored)."""

    tasks = ("words_rule",)
    tokenizers = ("sentencepiece",)
    sentencepiece_tokens = {"flamingo_tokens": True}  # <image>, <|endofchunk|>
    sharded = False

    def inputs(self) -> tuple[int, int]:
        return 64, {**LM_MODELS, **LLAMA_MODELS}[self.cfg.model.name]["context_length"]  # (no images)

    def check(self, world_size: int) -> str | None:
        cfg = self.cfg
        kind = cfg.data.train.partition(":")[0]
        if kind not in INTERLEAVED:
            return (f"model.name={cfg.model.name} with data.train={cfg.data.train}: language models and Flamingo train "
                    f"on interleaved specs ({', '.join(INTERLEAVED)})")
        if cfg.lm.induction_fraction and (not 0 < cfg.lm.induction_fraction < 1 or kind == "interleaved_wds"):
            return (f"lm.induction_fraction must lie in [0, 1) and is for language models on map-style interleaved specs "
                    f"(shapes_icl, interleaved); got {cfg.lm.induction_fraction} with model.name '{cfg.model.name}' and "
                    f"data.train '{cfg.data.train}'")
        if cfg.model.pretrained and cfg.model.name not in FLAMINGO_MODELS:  # a Flamingo's is a run's (its check)
            problem = released_folder_problem("model.pretrained", cfg.model.pretrained, cfg.model.name)
            if problem:
                return problem
        return check_unused(cfg, "lm")

    def build_model(self, tokenizer, pretrained: bool = True) -> torch.nn.Module:
        start = self.cfg.model.pretrained if pretrained else ""
        if start and not is_run_checkpoint(start):  # released weights: a HuggingFace MPT or LLaMA folder
            return create_lm(self.cfg.model.name, pretrained=start)
        model = create_lm(self.cfg.model.name, vocab_size=tokenizer.vocab_size,
                          context_length=tokenizer.context_length)
        if start:
            load_run_weights(model, start)
        return model

    def loader_options(self) -> dict:
        return {"text_only": True, "induction_fraction": self.cfg.lm.induction_fraction}

    def train_step(self, model, micro_batches, step, device, autocast, scaler) -> dict[str, torch.Tensor]:
        def losses(batch):
            tokens = batch["tokens"].to(device, non_blocking=True)
            labels = lm_labels(tokens, PAD_ID, batch.get("prompt_lengths", 0))  # induction rows: the repeat only
            return {"lm": lm_loss(model(tokens), labels, label_smoothing=0.0)}

        return mean_step(model, micro_batches, losses, autocast, scaler)

    def evaluate(self, model, tokenizer, device, writer=None, step: int = 0) -> dict:
        return fewshot.evaluate_run(self.cfg, model, tokenizer, device, fewshot=False)

    def run_task(self, task: str, model, tokenizer, spec: str, args) -> dict:
        """words_rule: whether the model reads shapes_icl's in-context rule (evaluation/fewshot.py)."""
        return fewshot.words_rule_accuracy(model, tokenizer, spec, args.device, image_size=self.cfg.data.image_size)


class FlamingoRecipe(LanguageModelRecipe):
    """A Flamingo preset: resampler and gated cross-attention trained between a frozen CLIP tower and LM."""

    tasks = fewshot.TASKS

    def inputs(self) -> tuple[int, int]:
        preset = FLAMINGO_MODELS[self.cfg.model.name]
        return MODELS[preset["vision"]].image_size, LM_MODELS[preset["lm"]]["context_length"]

    def check(self, world_size: int) -> str | None:
        cfg = self.cfg
        if cfg.model.pretrained and not is_run_checkpoint(cfg.model.pretrained):
            return (f"model.pretrained '{cfg.model.pretrained}': a Flamingo run starts from another run's "
                    f"checkpoint.pt (its frozen parts come from flamingo.lm_checkpoint and model.vision_checkpoint)")
        if cfg.flamingo.lm_checkpoint:  # an MPT folder's architecture must be the preset's language model's
            problem = released_folder_problem("flamingo.lm_checkpoint", cfg.flamingo.lm_checkpoint,
                                              FLAMINGO_MODELS[cfg.model.name]["lm"])
            if problem:
                return problem
        return check_unused(cfg, "flamingo") or super().check(world_size)

    def build_model(self, tokenizer, pretrained: bool = True) -> torch.nn.Module:
        """With `pretrained`, its frozen parts (flamingo.lm_checkpoint, model.vision_checkpoint) and model.pretrained."""
        cfg = self.cfg
        model = create_flamingo(cfg.model.name, tokenizer, cfg.data.image_size, tokenizer.context_length,
                                cfg.flamingo.lm_checkpoint if pretrained else "",
                                cfg.model.vision_checkpoint if pretrained else "")
        if pretrained and cfg.model.pretrained:
            if not is_run_checkpoint(cfg.model.pretrained):
                raise ValueError(f"model.pretrained '{cfg.model.pretrained}': a Flamingo run starts from another run's "
                                 f"checkpoint.pt; released OpenFlamingo files load through create_model (README)")
            load_run_weights(model, cfg.model.pretrained)
        return model

    def prepare(self, model) -> None:
        freeze_for_training(model)  # the resampler, the cross-attention and two embedding rows train

    def loader_options(self) -> dict:
        return {}

    def train_step(self, model, micro_batches, step, device, autocast, scaler) -> dict[str, torch.Tensor]:
        def losses(batch):
            images = batch.get("images", batch.get("image"))
            return model(images.to(device, non_blocking=True), batch["tokens"].to(device, non_blocking=True))

        return mean_step(model, micro_batches, losses, autocast, scaler)

    def evaluate(self, model, tokenizer, device, writer=None, step: int = 0) -> dict:
        return fewshot.evaluate_run(self.cfg, model, tokenizer, device, fewshot=True)

    def run_task(self, task: str, model, tokenizer, spec: str, args) -> dict:
        seeds = list(range(args.seeds[0])) if len(args.seeds) == 1 else args.seeds  # --seeds 3: 0, 1, 2
        released = getattr(args, "model", None) in FLAMINGO_MODELS  # OpenFlamingo's weights: its prompt strings
        return fewshot.evaluate(model, tokenizer, spec, task, self.cfg.data.image_size, args.device,
                                args.shots or [0, 4, 8], seeds, args.rices, self.cfg.data, args.batch_size,
                                args.num_beams, num_queries=args.num_queries,
                                prompts="open_flamingo" if released else "ours",
                                frames=self.cfg.video.frames if is_video_spec(spec) else 0)  # clips as media

    @classmethod
    def load_released(cls, name: str, pretrained: str, vision: str | None = None, lm: str | None = None, **unused):
        """(config, model, tokenizer) with released OpenFlamingo weights: checkpoint.pt, the CLIP file and the LM
        folder, whose tokenizer.json gives GPT-NeoX's tokenizer with OpenFlamingo's tokens."""
        if not lm or not vision:
            raise ValueError(f"--model {name} needs --lm (the language model's folder, with tokenizer.json) and "
                             f"--vision (the CLIP checkpoint) besides --pretrained (OpenFlamingo's checkpoint.pt)")
        tokenizer_path = os.path.join(lm, "tokenizer.json")
        if not os.path.isfile(tokenizer_path):
            raise FileNotFoundError(f"--lm: no tokenizer.json in '{lm}' (GPT-NeoX-20B's, which "
                                    f"anas-awadalla/mpt-1b-redpajama-200b holds)")
        tokenizer = GPTNeoXTokenizer(tokenizer_path)
        model = create_model(name, pretrained=pretrained, vision=vision, lm=lm, tokenizer=tokenizer)
        cfg = Config()
        cfg.model.name = name
        cfg.data.image_size, cfg.data.context_length = model.vision_encoder.image_size, tokenizer.context_length
        return cfg, model, tokenizer
