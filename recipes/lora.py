"""LoRA fine-tuning of any family's trained model (Hu et al., ICLR 2022; models/lora.py): `finetune.strategy=lora`
with `model.pretrained` (a train.py checkpoint.pt of model.name, or the released weights its family loads).

    python train.py --config configs/clip/tiny_shapes.yaml --model.pretrained=runs/tiny/checkpoint.pt \\
        --finetune.strategy=lora --finetune.lora_rank=8 --out_dir=runs/tiny_lora

`LoraRecipe` wraps the recipe of model.name (CLIP, SigLIP, BLIP, the LM, Flamingo) and delegates everything to it
(its checks, tokenizer, data, losses, evaluation) except what trains: the family builds its model from
model.pretrained as usual, then the linear layers matching finetune.lora_targets (default: every attention
projection) get adapters and all else is frozen. Parameters matching finetune.lora_heads (the same pattern rules,
on parameter names, e.g. `logit_scale,visual.proj,text.proj` for CLIP's temperature and projections, `itm_head,
vision_proj,text_proj` for BLIP's heads, `perceiver,gated_cross_attn_layers` for Flamingo's own parts) train too,
where the family itself trains them (a fixed temperature stays fixed).

What the family keeps untrained stays so: an adapter on a layer the family built frozen does not train (BLIP's
momentum encoders, copies that follow the online ones by EMA, get copies of the online adapters and follow them;
a locked tower's adapters stay at zero), and a BatchNorm whose parameters are all frozen keeps its running
statistics (eval mode): the adapters and the heads asked for are all that moves, besides the state the family
itself updates without gradients (BLIP's momentum copies and queue).

Checkpoints, the merged checkpoint.pt at the end, lora.pt and `--resume` of either: recipes/finetune.py's module
docstring (the classification strategy `finetune.strategy=lora` with finetune.init or finetune.pretrained is that
file's). FSDP is not supported (registry: `sharded`).
"""
import torch
from torch import nn

from crossmodal.config import BadInput
from crossmodal.models.lora import ADAPTER_KEYS, LoRALinear, matches, merge_lora
from crossmodal.recipes import registry
from crossmodal.recipes.base import Recipe
from crossmodal.recipes.finetune import (adapt, finish_lora, lora_problem, lora_weights, report_trainable,
                                         resume_merged)


def is_family_lora(cfg) -> bool:
    """finetune.strategy=lora without finetune.init or finetune.pretrained (those are FinetuneRecipe's)."""
    return cfg.finetune.strategy == "lora" and not (cfg.finetune.init or cfg.finetune.pretrained)


def family_recipe(cfg) -> Recipe:
    """The recipe model.name's run would have without finetune.strategy, sharing `cfg` (its plan() fills it)."""
    strategy, cfg.finetune.strategy = cfg.finetune.strategy, ""
    try:
        return registry.recipe_for(cfg)
    finally:
        cfg.finetune.strategy = strategy


class LoraRecipe(Recipe):
    """model.name's own recipe with LoRA adapters on its trained model (module docstring)."""

    sharded = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.family = family_recipe(cfg)
        self.tasks, self.tokenizers = self.family.tasks, self.family.tokenizers
        self.sentencepiece_tokens = self.family.sentencepiece_tokens
        self.resuming, self.trainable_at_build = None, {}

    # ------------------------------------------------------------ configuration

    def inputs(self) -> tuple[int, int]:
        return self.family.inputs()

    def adopt(self) -> None:
        self.family.adopt()

    def check(self, world_size: int) -> str | None:
        if not self.cfg.model.pretrained:
            return ("finetune.strategy=lora adapts a trained model: give model.pretrained (a train.py checkpoint.pt "
                    "of model.name), or finetune.init / finetune.pretrained to fine-tune a CLIP classifier")
        return lora_problem(self.cfg) or self.family.check(world_size)

    def plan(self) -> None:
        self.family.plan()

    # ------------------------------------------------------------ building

    def build_tokenizer(self, out_dir: str, checkpoint: dict | None = None):
        self.resuming = checkpoint  # build_model: a merged checkpoint gets new adapters
        return self.family.build_tokenizer(out_dir, checkpoint)

    def caption_options(self) -> dict:
        return self.family.caption_options()

    def build_model(self, tokenizer, pretrained: bool = True) -> nn.Module:
        """The family's model (from model.pretrained for a new run) with adapters; what the family built trainable,
        by parameter name (an adapted layer keeps its weight's and bias's names), is kept for `prepare`."""
        model = self.family.build_model(tokenizer, pretrained)
        self.trainable_at_build = {name: param.requires_grad for name, param in model.named_parameters()}
        adapt(model, self.cfg)
        copy_momentum_adapters(model)
        resume_merged(self.resuming, model)
        return model

    def build_eval_model(self, tokenizer) -> nn.Module:
        return self.family.build_eval_model(tokenizer)  # plain: evaluation_weights merges

    def evaluation_weights(self, checkpoint: dict) -> dict:
        return self.family.evaluation_weights(lora_weights(checkpoint))

    def prepare(self, model: nn.Module) -> None:
        """The family's own freezing decides what of finetune.lora_heads may train; then the adapters (of layers
        the family built trainable) and those heads train, nothing else."""
        adapters = {name for name, _ in model.named_parameters() if name.rpartition(".")[2] in ADAPTER_KEYS}
        for name, param in model.named_parameters():
            if name not in adapters:
                param.requires_grad_(self.trainable_at_build.get(name, False))
        self.family.prepare(model)
        family_trained = {name for name, param in model.named_parameters() if param.requires_grad}
        heads = [part.strip() for part in self.cfg.finetune.lora_heads.split(",") if part.strip()]
        model.requires_grad_(False)
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear) and self.trainable_at_build.get(f"{name}.weight" if name else "weight"):
                module.lora_a.requires_grad_(True)
                module.lora_b.requires_grad_(True)
        for pattern in heads:
            chosen = [(name, param) for name, param in model.named_parameters()
                      if name in family_trained and name not in adapters and matches_parameter(name, pattern)]
            if not chosen:
                examples = sorted({name.split(".")[0] for name in family_trained - adapters})[:6]
                raise BadInput(f"finetune.lora_heads: '{pattern}' matches no parameter {self.cfg.model.name}'s recipe "
                               f"trains; e.g. {', '.join(examples) or 'none'}")
            for _, param in chosen:
                param.requires_grad_(True)
        report_trainable(model)

    def trainable_layers(self, model: nn.Module) -> list | None:
        return None  # the optimizer takes what requires grad: the adapters and the heads

    def ddp_options(self) -> dict:
        return self.family.ddp_options()

    def loader_options(self) -> dict:
        return self.family.loader_options()

    # ------------------------------------------------------------ training

    def begin(self, step: int, resumed: bool) -> None:
        self.family.begin(step, resumed)

    def train_step(self, model, micro_batches, step, device, autocast, scaler) -> dict[str, torch.Tensor]:
        return self.family.train_step(model, micro_batches, step, device, autocast, scaler)

    def before_step(self, model: nn.Module, step: int) -> dict[str, float]:
        frozen_norms_to_eval(model)  # train.py's model.train() put them back in training mode
        return self.family.before_step(model, step)

    def after_step(self, model: nn.Module) -> None:
        self.family.after_step(model)

    # ------------------------------------------------------------ evaluation

    def evaluate(self, model, tokenizer, device, writer=None, step: int = 0) -> dict:
        return self.family.evaluate(model, tokenizer, device, writer, step)

    def after_evaluation(self, results: dict, step: int) -> tuple[str | None, bool]:
        return self.family.after_evaluation(results, step)

    def finish(self, model, tokenizer, device, results: dict) -> dict:
        """The family's final results, then checkpoint.pt merged and lora.pt (finetune.finish_lora); the model is
        left merged."""
        results = self.family.finish(model, tokenizer, device, results)
        finish_lora(self.cfg)
        merge_lora(model)
        return results

    def run_task(self, task: str, model, tokenizer, spec: str, args) -> dict:
        return self.family.run_task(task, model, tokenizer, spec, args)

    def check_task(self, task: str, model) -> str | None:
        return self.family.check_task(task, model)


def matches_parameter(name: str, pattern: str) -> bool:
    """A lora_heads pattern on a parameter name: as lora_targets' on module names, or naming a module above it."""
    return matches(name, (pattern,)) or any(matches(name.rsplit(".", depth)[0], (pattern,))
                                            for depth in range(1, name.count(".") + 1))


def copy_momentum_adapters(model: nn.Module) -> None:
    """A model with momentum copies of its online parts (BLIP's `momentum_pairs`, built before the adapters were
    added) gets the online adapters copied into them, so the copies again equal the online parts."""
    if not callable(getattr(model, "momentum_pairs", None)) or getattr(model, "text_encoder_m", None) is None:
        return
    with torch.no_grad():
        for param, param_m in zip(model.momentum_pairs(online=True), model.momentum_pairs(online=False), strict=True):
            param_m.copy_(param)


def frozen_norms_to_eval(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are all frozen in eval mode: their running statistics stay as loaded."""
    for module in model.modules():
        frozen = not any(param.requires_grad for param in module.parameters())
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and frozen:
            module.eval()
