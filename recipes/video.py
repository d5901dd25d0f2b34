"""Video CLIP (CLIP4Clip, Luo et al., 2022; models/video.py): a CLIP preset trained contrastively on clips and their
captions, started from an image CLIP run. Chosen for any config whose data.train is a video spec (moving_shapes,
video_csv, msrvtt); `video.pool` picks mean pooling or the temporal Transformer, `video.frames` the frames a clip.

    python train.py --config configs/clip/tiny_shapes.yaml --model.pretrained=runs/clip_tiny_shapes/checkpoint.pt \\
        --data.train=moving_shapes:train --data.val=moving_shapes:val --data.heldout=moving_shapes:heldout \\
        --video.pool=transformer --video.frames=8 --out_dir=runs/video_transformer
    python eval.py --checkpoint RUN/checkpoint.pt --task video_retrieval --data moving_shapes:val --out F.json

Everything but the model, the data's frames and the evaluation is the contrastive recipe's (recipes/clip.py): the
loss (clip or siglip), exact accumulation, the temperature and its clamp, and the start's tokenizer. The image CLIP
run's weights load into the wrapped CLIP (`clip.`); the temporal module starts as mean pooling (zero projection),
so step 0 scores what the image model scores on the frame average. During training the run reports video retrieval
on data.val (and moving_shapes:val_order, the val clips whose captions depend on order alone, as `val_order/`) and
on data.heldout. A video run's checkpoint still embeds single images, so the image tasks work on it too. FSDP is not
supported (`sharded`).

video.reverse_negatives (moving_shapes only): each training clip also enters the batch reversed in time, with the
reversed clip's caption (`train_step`; the loader's `reversed_image`, `reversed_tokens`). Random batches almost never
hold a clip beside its reversal, so without them order is barely rewarded; mean pooling gives the two the same
feature, so only the temporal model can tell them apart. video.order_weight adds `order_loss`, each clip against
its reversal alone: among in-batch negatives a clip's reversal is one of 2N - 1 and content dominates the loss;
the pair-only term weighs order as much. configs/video/tiny_moving_shapes.yaml is the demo.
"""
import torch
import torch.nn.functional as F

from crossmodal import checkpointing
from crossmodal.config import ConfigError
from crossmodal.data import is_video_spec
from crossmodal.evaluation import video
from crossmodal.models import MODELS
from crossmodal.models.video import POOLS, VideoCLIP
from crossmodal.recipes.base import contrastive_step
from crossmodal.recipes.clip import LOSSES, ClipRecipe


def is_video_run(cfg) -> bool:
    """A run on clips: data.train is a video spec."""
    return is_video_spec(cfg.data.train)


class VideoRecipe(ClipRecipe):
    """Contrastive clip-text training of a CLIP preset with temporal pooling (module docstring)."""

    tasks = ("video_retrieval", *ClipRecipe.tasks)
    sharded = False

    def inputs(self) -> tuple[int, int]:
        if self.cfg.model.name not in MODELS:
            raise ConfigError(self.not_clip())
        return super().inputs()

    def not_clip(self) -> str:
        return (f"data.train={self.cfg.data.train} is a video spec, trained as a video CLIP: model.name must be a "
                f"CLIP preset (e.g. RN-tiny, ViT-B-32); got '{self.cfg.model.name}'")

    def check(self, world_size: int) -> str | None:
        cfg = self.cfg
        if cfg.model.name not in MODELS:
            return self.not_clip()
        if cfg.video.pool not in POOLS:
            return f"video.pool must be one of {', '.join(POOLS)}; got '{cfg.video.pool}'"
        if cfg.loss.name not in LOSSES:
            return (f"loss.name must be one of {', '.join(LOSSES)} for a video run (data.train={cfg.data.train}); "
                    f"got '{cfg.loss.name}'")
        if cfg.finetune.strategy not in ("", "lora"):
            return (f"finetune.strategy={cfg.finetune.strategy} fine-tunes an image classifier; data.train="
                    f"{cfg.data.train} is a video spec (a video run trains contrastively, or with lora)")
        if cfg.video.order_weight and not cfg.video.reverse_negatives:
            return (f"video.order_weight={cfg.video.order_weight} weighs a loss over each clip and its reversal: it "
                    f"needs video.reverse_negatives=true")
        if cfg.video.reverse_negatives and cfg.data.train.partition(":")[0] != "moving_shapes":
            return (f"video.reverse_negatives needs clips whose time reversal has a known caption (moving_shapes "
                    f"specs); data.train is '{cfg.data.train}'")
        for key in ("val", "heldout"):
            spec = getattr(cfg.data, key)
            if spec and not is_video_spec(spec):
                return (f"data.{key}={spec} is not a video spec; a video run evaluates video retrieval on it (e.g. "
                        f"moving_shapes:{key}, video_csv:FILE), or '' for none")
        start = checkpointing.read_run(cfg.model.pretrained) if cfg.model.pretrained else None
        if start is not None and is_video_spec(start["config"]["data"]["train"]):
            return (f"model.pretrained '{cfg.model.pretrained}' is a video run; a video run starts from an image CLIP "
                    f"run's checkpoint.pt (continue a video run with --resume)")
        return super().check(world_size)

    def build_model(self, tokenizer, pretrained: bool = True) -> torch.nn.Module:
        """The CLIP preset (with model.pretrained's weights for a new run), wrapped for clips."""
        clip = super().build_model(tokenizer, pretrained)
        video_cfg = self.cfg.video
        return VideoCLIP(clip, video_cfg.pool, max_frames=video_cfg.frames, temporal_layers=video_cfg.layers)

    def trainable_layers(self, model: torch.nn.Module) -> list | None:
        """The temporal module at video.temporal_lr_scale times train.lr (it starts from zero, the tower trained)."""
        scale = self.cfg.video.temporal_lr_scale
        if scale == 1 or self.cfg.video.pool != "transformer":
            return None
        named = list(model.named_parameters())
        return [(1.0, [(name, p) for name, p in named if not name.startswith("temporal.")]),
                (scale, [(name, p) for name, p in named if name.startswith("temporal.")])]

    def loader_options(self) -> dict:
        return {"frames": self.cfg.video.frames, "reverse": self.cfg.video.reverse_negatives}

    def train_step(self, model, micro_batches, step, device, autocast, scaler) -> dict[str, torch.Tensor]:
        """The contrastive step; with video.reverse_negatives each micro-batch's reversed clips and their captions
        are appended to it (2B rows), so the loss sees every clip beside its time reversal. The rows are added
        inside `features`, so exact accumulation caches and recomputes them with their micro-batch, and every
        process gathers the same number of rows."""
        reverse = self.cfg.video.reverse_negatives

        def features(batch):
            clips, tokens = batch["image"], batch["tokens"]
            if reverse:
                clips = torch.cat([clips, batch["reversed_image"]])  # (2B, frames, 3, H, W)
                tokens = torch.cat([tokens, batch["reversed_tokens"]])  # (2B, context)
            return model(clips.to(device, non_blocking=True), tokens.to(device, non_blocking=True))

        weight = self.cfg.video.order_weight
        if not weight:
            return {self.cfg.loss.name: contrastive_step(model, micro_batches, features, self.loss, autocast, scaler)}
        sizes = [2 * len(batch["image"]) for batch in micro_batches]  # each micro-batch's rows: clips, then reversals
        order = []

        def loss(images, texts, scale, bias):
            order.append(order_loss(images, texts, scale, sizes))
            return self.loss(images, texts, scale, bias) + weight * order[-1]

        total = contrastive_step(model, micro_batches, features, loss, autocast, scaler)
        return {self.cfg.loss.name: total - weight * order[-1].detach(), "order": order[-1].detach()}

    def evaluate(self, model, tokenizer, device, writer=None, step: int = 0) -> dict:
        return video.evaluate_run(self.cfg, model, tokenizer, device)

    def run_task(self, task: str, model, tokenizer, spec: str, args) -> dict:
        if task != "video_retrieval":
            return super().run_task(task, model, tokenizer, spec, args)  # images, through the image tower
        return video.video_retrieval(model, tokenizer, spec, self.cfg.data.image_size, self.cfg.video.frames,
                                     args.device, args.batch_size, args.workers, self.cfg.data, self.cfg.seed)


def order_loss(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """video.order_weight's loss: within each clip's pair (the clip and its reversal, rows i and b + i of a
    micro-batch of b clips; `sizes`: each micro-batch's 2b rows), each caption picks its clip over the other and each
    clip its caption over the other's, by softmax cross-entropy over the two at the loss's logit scale. In-batch
    negatives weigh a clip's reversal as one of 2N - 1; here it is the only one, so order is rewarded as strongly as
    content. Local to this process's rows (every pair is in them), a mean over 4 x pairs choices."""
    scores = []
    for video_rows, text_rows in zip(images.split(sizes), texts.split(sizes)):
        v, t = video_rows.unflatten(0, (2, -1)), text_rows.unflatten(0, (2, -1))  # (2, b, D): clips, reversals
        scores.append(torch.einsum("ibd,jbd->bij", v, t))  # (b, 2 clips, 2 captions)
    scores = scale * torch.cat(scores)  # (pairs, 2, 2)
    target = torch.arange(2, device=scores.device).repeat(len(scores))
    return (F.cross_entropy(scores.flatten(0, 1), target)  # each clip picks its caption
            + F.cross_entropy(scores.transpose(1, 2).flatten(0, 1), target)) / 2  # each caption its clip
