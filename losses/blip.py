"""BLIP's pretraining and retrieval-finetuning objectives: ITC with momentum distillation, ITM with hard
negatives, and the captioning / VQA language-modelling losses, as pure tensor functions plus two small
stateful pieces (the momentum-feature queue and the EMA of the momentum encoders).

Li et al. 2022, "BLIP: Bootstrapping Language-Image Pre-training for Unified Vision-Language Understanding
and Generation" (ITC, ITM, LM: loss = ITC + ITM + LM), which takes momentum distillation and the feature
queue from Li et al. 2021, "Align before Fuse" (ALBEF). Reference code: salesforce/BLIP
`models/blip_pretrain.py`, `models/blip_retrieval.py`, `models/med.py::BertLMHeadModel`, `models/blip_vqa.py`.

API (every tensor argument is this process's own unless it says "gathered"; B = local batch, W = ranks,
N = W*B global batch, K = queue size, D = 256):

    all_gather_no_grad(x)                    (B, ...) -> (N, ...) in rank order, no gradient; identity on 1 process
    diagonal_positives(rows, columns, offset) (rows, columns) bool, True at (i, offset + i): one pair per row
    positives_from_ids(ids, column_ids)      (B, M) bool, True where the image ids match (retrieval finetuning)
    distillation_targets(sim_m, positives, alpha)  alpha * softmax(sim_m) + (1 - alpha) * positives / #positives
    itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
             *, offset, positives=None)      scalar: mean of the i2t and t2i soft cross-entropies
    alpha_ramp(alpha, step, warmup_steps)    alpha * min(1, step / warmup_steps)
    FeatureQueue(dim, size)                  buffers image_queue/text_queue (D, K), idx_queue (1, K), ptr (1,);
        .enqueue(image_feat_m, text_feat_m, idx=None)  gathers over ranks, overwrites the oldest N columns
    copy_params(params, params_m)            params_m <- params, and params_m stop requiring grad
    momentum_update(params, params_m, momentum=0.995)  params_m <- momentum * params_m + (1 - momentum) * params
    sample_hard_negatives(sim_i2t, sim_t2i, positives, generator=None, uniform=0.0)  (B,) negative text per
                                             image, (B,) negative image per text, column indices; never a positive
    itm_loss(logits_pos, logits_neg)         CE of (B, 2) positives (label 1) then (2B, 2) negatives (label 0)
    lm_labels(tokens, pad_token_id, prompt_length=0)  labels with pads and the prompt (an int or (B,)) set to -100
    lm_loss(logits, labels, label_smoothing=0.1)      next-token CE, mean over labelled tokens
    sequence_lm_loss(logits, labels, label_smoothing=0.1)  (B,) per-sequence sum (VQA answer weights/ranking)

One training step of a BLIP model (`temp` clamped to [0.001, 0.5] first, under no_grad, as BLIP does):

    image_feat, text_feat                    # (B, D) normalised, with grad
    with torch.no_grad():
        momentum_update(online_params, momentum_params)          # before the momentum forward
        image_feat_m, text_feat_m            # (B, D) from the momentum encoders
        image_feat_m_all, text_feat_m_all = all_gather_no_grad(image_feat_m), all_gather_no_grad(text_feat_m)
    offset = distributed.rank() * B          # this rank's rows in the gathered batch
    positives = None                         # pretraining: the diagonal at offset; retrieval finetuning:
    #   positives_from_ids(idx, torch.cat([all_gather_no_grad(idx), queue.idx_queue[0]]))
    loss_itc = itc_loss(image_feat, text_feat, image_feat_m_all, text_feat_m_all, queue.image_queue,
                        queue.text_queue, temp, alpha_ramp(0.4, step, 2 * steps_per_epoch),
                        offset=offset, positives=positives)
    queue.enqueue(image_feat_m, text_feat_m, idx)               # local features, after the loss
    with torch.no_grad():                    # in-batch candidates, as BLIP's pretraining
        sim_i2t = image_feat @ text_feat_m.T / temp; sim_t2i = text_feat @ image_feat_m.T / temp  # (B, B)
    neg_text, neg_image = sample_hard_negatives(sim_i2t, sim_t2i, diagonal_positives(B, B))
    #   (retrieval: positives_from_ids(idx, idx); negatives from all ranks: sims against the gathered
    #   features, positives_from_ids(idx, all_gather_no_grad(idx)), then index all_gather_with_grad(image_embeds)
    #   and all_gather_no_grad(input_ids / attention_mask) with the returned indices)
    pos = ITM head on (text_i, image_i); neg = ITM head on cat[(text_i, image neg_image[i]), (text neg_text[i], image_i)]
    loss_itm = itm_loss(pos, neg)
    loss_lm = lm_loss(decoder_logits, lm_labels(decoder_ids, pad_token_id, prompt_length))  # [DEC] first

Deliberate differences from the reference code:
* ITC columns are the momentum features of the *global* batch (gathered, no gradient), then the queue;
  BLIP uses only this GPU's momentum batch, then the queue. With ours, DDP's gradient average equals one
  process holding the whole batch (tested). Pass the local momentum features and offset=0 for BLIP's form.
* BLIP's released `blip_retrieval.py` computes the same-image-id targets and then overwrites them with the
  diagonal (`sim_targets = torch.zeros(...); fill_diagonal_(1)`), so its finetuning uses diagonal targets;
  LAVIS removed the overwrite. `positives` gives either: the ids (paper and LAVIS) or None (released BLIP).
* Hard-negative weights are softmax + 1e-4 with the positives zeroed in both settings (BLIP's retrieval has no
  +1e-4): a row whose softmax underflowed still samples a negative. A row with no negative raises an error.
* `uniform` mixes a flat draw into the hard-negative one (0 = BLIP). Training from scratch, an ITM head that
  only ever sees the ITC's hardest negatives stays at the prior (docs/results.md, BLIP demo): the easy
  negatives give it a gradient to start from. BLIP never needs it: its text side starts from BERT.
* ITC similarities are computed in float32 with autocast off (as kernels/reference.py), since logits up to
  1/0.001 lose their ordering in bfloat16. BLIP uses no mixed precision at all.
* The queue writes at (ptr + arange(N)) % K, so it wraps correctly even if the global batch changes, and
  needs no process group with one process (BLIP's `concat_all_gather` crashes without one).
"""
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from crossmodal import distributed

HARD_NEGATIVE_EPS = 1e-4  # BLIP's pretraining adds it to the softmax weights before zeroing the positives


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W ranks -> (W*B, ...), rank order, without gradient; identity with one process."""
    if distributed.world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(distributed.world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------- ITC


def diagonal_positives(rows: int, columns: int, offset: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """(rows, columns) bool mask with row i's only positive at column offset + i."""
    mask = torch.zeros(rows, columns, dtype=torch.bool, device=device)
    mask[torch.arange(rows, device=device), torch.arange(rows, device=device) + offset] = True
    return mask


def positives_from_ids(ids: torch.Tensor, column_ids: torch.Tensor) -> torch.Tensor:
    """(B,) image ids of the rows, (M,) of the columns -> (B, M) bool, True where they are the same image.

    Ids must be >= 0: the queue's unused slots hold -100 (as BLIP's idx_queue) and never match.
    """
    return ids.view(-1, 1) == column_ids.view(1, -1)


def distillation_targets(sim_m: torch.Tensor, positives: torch.Tensor, alpha: float) -> torch.Tensor:
    """Momentum-distillation targets: alpha * softmax(sim_m) + (1 - alpha) * hard targets (ALBEF eq. 2).

    sim_m (B, M) are the momentum model's similarities / temp; the hard targets spread each row's mass
    equally over its positives (`pos_idx / pos_idx.sum(1)`), the one-hot diagonal when there is one.
    """
    hard = positives.to(sim_m.dtype)
    hard = hard / hard.sum(1, keepdim=True)
    return alpha * F.softmax(sim_m, dim=1) + (1 - alpha) * hard


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor | float,
    alpha: float,
    *,
    offset: int,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-text contrastive loss against [momentum batch; queue] with momentum-distillation targets.

    image_feat, text_feat: (B, D) normalised, this rank's batch, with gradient.
    image_feat_m, text_feat_m: (N, D) normalised momentum features of the gathered global batch (or the local
        batch with offset=0, as BLIP); this rank's pairs are rows offset ... offset + B - 1.
    image_queue, text_queue: (D, K) momentum features of earlier batches (FeatureQueue's buffers); K may be 0.
    temp: the learnable temperature (gradient flows through it); alpha: distillation weight, 0 = hard targets.
    positives: (B, N + K) bool, the pairs counted as matching (same image id); None = the diagonal at offset.
    Returns (loss_i2t + loss_t2i) / 2, each a mean over this rank's rows.
    """
    batch_size = image_feat.shape[0]
    if image_feat_m.shape[0] < offset + batch_size:
        raise ValueError(
            f"this rank's rows {offset}..{offset + batch_size - 1} lie outside the momentum batch of "
            f"{image_feat_m.shape[0]}: pass the gathered momentum features and offset = rank * local batch"
        )
    with torch.autocast(image_feat.device.type, enabled=False):  # logits up to 1/temp = 1000: not in bf16
        dtype = torch.promote_types(image_feat.dtype, torch.float32)
        temp = torch.as_tensor(temp, device=image_feat.device).to(dtype)
        # columns: momentum batch then queue; both carry no gradient (BLIP clones and detaches them)
        image_columns = torch.cat([image_feat_m.detach(), image_queue.detach().T]).to(dtype)  # (N + K, D)
        text_columns = torch.cat([text_feat_m.detach(), text_queue.detach().T]).to(dtype)  # (N + K, D)
        if positives is None:
            positives = diagonal_positives(batch_size, text_columns.shape[0], offset, image_feat.device)

        with torch.no_grad():
            local_m = slice(offset, offset + batch_size)
            sim_i2t_m = image_feat_m[local_m].to(dtype) @ text_columns.T / temp  # (B, N + K)
            sim_t2i_m = text_feat_m[local_m].to(dtype) @ image_columns.T / temp  # (B, N + K)
            targets_i2t = distillation_targets(sim_i2t_m, positives, alpha)
            targets_t2i = distillation_targets(sim_t2i_m, positives, alpha)

        sim_i2t = image_feat.to(dtype) @ text_columns.T / temp  # (B, N + K)
        sim_t2i = text_feat.to(dtype) @ image_columns.T / temp  # (B, N + K)
        loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets_i2t).sum(1).mean()
        loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets_t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def alpha_ramp(alpha: float, step: int, warmup_steps: int) -> float:
    """Distillation weight ramped linearly from 0 (BLIP pretraining: over the first 2 epochs, 0.4 after)."""
    if warmup_steps <= 0:
        return alpha
    return alpha * min(1.0, step / warmup_steps)


class FeatureQueue(nn.Module):
    """FIFO of momentum features from earlier global batches: the extra ITC negatives (MoCo, ALBEF, BLIP).

    Starts with random unit vectors and ids -100 (no id matches), as BLIP. Every rank holds the same queue:
    each enqueues the same gathered batch.
    """

    def __init__(self, dim: int = 256, size: int = 57600):
        super().__init__()
        self.size = size
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, size), dim=0))  # (D, K)
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, size), dim=0))  # (D, K)
        self.register_buffer("idx_queue", torch.full((1, size), -100, dtype=torch.long))  # (1, K)
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, idx: torch.Tensor | None = None) -> None:
        """Gather this step's (B, D) momentum features (and (B,) image ids) over ranks; overwrite the oldest."""
        if self.size == 0:
            return
        image_feats = all_gather_no_grad(image_feat_m)  # (N, D)
        text_feats = all_gather_no_grad(text_feat_m)  # (N, D)
        global_batch = image_feats.shape[0]
        if self.size % global_batch != 0:
            raise ValueError(
                f"queue size {self.size} must be a multiple of the global batch {global_batch} "
                f"(local batch {image_feat_m.shape[0]} x {distributed.world_size()} ranks), as in BLIP"
            )
        ptr = int(self.ptr)
        slots = (ptr + torch.arange(global_batch, device=self.ptr.device)) % self.size
        self.image_queue[:, slots] = image_feats.T.to(self.image_queue.dtype)
        self.text_queue[:, slots] = text_feats.T.to(self.text_queue.dtype)
        if idx is not None:
            self.idx_queue[0, slots] = all_gather_no_grad(idx.view(-1))
        self.ptr[0] = (ptr + global_batch) % self.size


# ------------------------------------------------------------------------------- momentum encoders


@torch.no_grad()
def copy_params(params: Iterable[torch.Tensor], params_m: Iterable[torch.Tensor]) -> None:
    """Initialise the momentum copies from the online parameters; they are never trained by gradient."""
    params, params_m = list(params), list(params_m)
    _check_pairs(params, params_m)
    for param, param_m in zip(params, params_m):
        param_m.copy_(param)
        param_m.requires_grad_(False)


@torch.no_grad()
def momentum_update(
    params: Iterable[torch.Tensor], params_m: Iterable[torch.Tensor], momentum: float = 0.995
) -> None:
    """EMA: param_m <- momentum * param_m + (1 - momentum) * param, in place, over paired lists."""
    params, params_m = list(params), list(params_m)
    _check_pairs(params, params_m)
    torch._foreach_mul_(params_m, momentum)
    torch._foreach_add_(params_m, params, alpha=1.0 - momentum)


def _check_pairs(params: list, params_m: list) -> None:
    # BLIP zips the two parameter lists, which silently drops the tail of a longer one
    if len(params) != len(params_m):
        raise ValueError(f"{len(params)} online parameters but {len(params_m)} momentum parameters")


# --------------------------------------------------------------------------------------------- ITM


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    positives: torch.Tensor,
    generator: torch.Generator | None = None,
    uniform: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per row, drawn with probability softmax(sim) + 1e-4, positives excluded.

    sim_i2t (B, M): images against M candidate texts; sim_t2i (B, M): texts against M candidate images
    (the local batch, or every rank's batch for BLIP's negative_all_rank). positives (B, M) bool: pair i's
    matches (the diagonal, or all captions of the same image) get weight 0 so they are never drawn.
    uniform: the share of the draw made uniformly over the non-positives instead (0 = BLIP): the weights are
    (1 - uniform) * hard + uniform * flat, each normalised over the row's negatives.
    Returns (negative text index per image, negative image index per text), each (B,) long into M.
    """
    if not 0.0 <= uniform <= 1.0:
        raise ValueError(f"uniform must lie in [0, 1]; got {uniform}")
    negatives = []
    for sim in (sim_i2t, sim_t2i):
        weights = F.softmax(sim.float(), dim=1) + HARD_NEGATIVE_EPS  # (B, M)
        weights.masked_fill_(positives, 0)
        if not (weights.sum(1) > 0).all():
            row = int((weights.sum(1) == 0).nonzero()[0])
            raise ValueError(f"row {row} has no negative candidate: all {sim.shape[1]} candidates are positives")
        if uniform > 0:
            flat = (~positives).float()
            weights = (1 - uniform) * weights / weights.sum(1, keepdim=True) + uniform * flat / flat.sum(1, keepdim=True)
        negatives.append(torch.multinomial(weights, 1, generator=generator).squeeze(1))  # (B,)
    return negatives[0], negatives[1]


def itm_loss(logits_pos: torch.Tensor, logits_neg: torch.Tensor) -> torch.Tensor:
    """Plain 2-way cross-entropy: (B, 2) matched pairs are class 1, (2B, 2) hard negatives class 0, one mean."""
    logits = torch.cat([logits_pos, logits_neg])  # (3B, 2)
    labels = torch.cat([logits_pos.new_ones(len(logits_pos)), logits_neg.new_zeros(len(logits_neg))]).long()
    return F.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------------------------- LM


def lm_labels(
    tokens: torch.Tensor, pad_token_id: int, prompt_length: int | torch.Tensor = 0, ignore_index: int = -100
) -> torch.Tensor:
    """(B, T) decoder input ids -> labels: pads and the first prompt_length positions set to ignore_index.

    prompt_length counts from [DEC]: captioning's "a picture of " gives 4 ([DEC] a picture of), as BLIP's
    `len(tokenizer(prompt).input_ids) - 1`; pretraining and VQA answers use 0. A (B,) tensor gives each row its
    own prompt (a batch mixing captions and "question: ... answer:" rows).
    """
    labels = tokens.masked_fill(tokens == pad_token_id, ignore_index)
    if isinstance(prompt_length, torch.Tensor):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return labels.masked_fill(positions < prompt_length.to(tokens.device).view(-1, 1), ignore_index)
    labels[:, :prompt_length] = ignore_index
    return labels


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1, ignore_index: int = -100
) -> torch.Tensor:
    """Next-token cross-entropy of (B, T, V) logits against (B, T) labels, mean over labelled tokens.

    label_smoothing=0.1 is hard-coded in BLIP's BertLMHeadModel for every decoder loss.
    """
    # position t predicts token t + 1: BERT's LM head scores [:, :-1] against labels [:, 1:]
    scores, targets = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    return F.cross_entropy(
        scores.flatten(0, 1), targets.flatten(), ignore_index=ignore_index, label_smoothing=label_smoothing
    )


def sequence_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1, ignore_index: int = -100
) -> torch.Tensor:
    """(B,) next-token cross-entropy summed over each sequence's labelled tokens (BLIP's reduction='none').

    VQA trains on sum_b weight_b * loss_b / batch and ranks candidate answers by -loss_b, label smoothing
    included, as BLIP does.
    """
    targets = labels[:, 1:]  # (B, T-1)
    token_losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction="none",
    )  # (B * (T-1),), 0 where ignored
    return token_losses.view(targets.shape).sum(1)
