"""Model families, one recipe each (recipes/base.py states the contract), and the preset registry.

A family is one model file (models/), one recipe (a module here) and one registry line below; train.py and eval.py
only ever call `recipe_for(cfg)` and the recipe's methods. docs/architecture.md walks through adding one.
"""
from crossmodal.models import BLIP_MODELS, FLAMINGO_MODELS, LLAMA_MODELS, LLAVA_MODELS, LLAVA_RUN_MODELS, LM_MODELS, MODELS
from crossmodal.recipes.base import Recipe, contrastive_step, mean_step
from crossmodal.recipes.blip import BlipRecipe
from crossmodal.recipes.clip import ClipRecipe, PredictiveRecipe, is_predictive
from crossmodal.recipes.finetune import FinetuneRecipe
from crossmodal.recipes.llava import LlavaRecipe
from crossmodal.recipes.lm import FlamingoRecipe, LanguageModelRecipe
from crossmodal.recipes.lora import LoraRecipe, is_family_lora
from crossmodal.recipes.registry import (FAMILIES, PRESETS, VARIANTS, check_config, load_released, load_run,
                                         model_from_config, recipe_for, register, resolve)
from crossmodal.recipes.video import VideoRecipe, is_video_run

register(ClipRecipe, MODELS)  # CLIP, SigLIP (loss.name), LiT (finetune.strategy=lit)
register(BlipRecipe, BLIP_MODELS)
register(LanguageModelRecipe, {**LM_MODELS, **LLAMA_MODELS})  # MPT- and LLaMA-style decoders
register(FlamingoRecipe, FLAMINGO_MODELS)
register(LlavaRecipe, {**LLAVA_MODELS, **LLAVA_RUN_MODELS})
VARIANTS.append((is_family_lora, LoraRecipe))  # LoRA on any family's run (a wrapper, no family); before FinetuneRecipe
register(VideoRecipe, (), when=is_video_run)  # a CLIP preset on clips (data.train a video spec); before FinetuneRecipe
register(FinetuneRecipe, (), when=lambda cfg: bool(cfg.finetune.strategy))  # classifier fine-tuning, LiT
register(PredictiveRecipe, (), when=is_predictive)  # loss.name caption | bow on a CLIP preset

__all__ = ["FAMILIES", "PRESETS", "Recipe", "check_config", "contrastive_step", "load_released", "load_run",
           "mean_step", "model_from_config", "recipe_for", "register", "resolve"]
