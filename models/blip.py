"""BLIP: bootstrapping language-image pre-training (Li et al., ICML 2022, arXiv 2201.12086).

A ViT image encoder and a BERT-style text transformer used three ways ("MED", paper section 3.1): the unimodal
text encoder ([CLS] first) gives the image-text contrastive (ITC) features through `vision_proj`/`text_proj`; the
image-grounded encoder ([ENC] first, cross-attending the image tokens) feeds the image-text matching (ITM) head;
the image-grounded decoder ([DEC] first, causal) is the captioner. With `tie_text_decoder` the decoder shares all
but its self-attention with the encoder, as in BLIP's pretraining (paper Table 3).

`forward(images, tokens, image_ids, alpha)` is one pretraining / finetuning step's objectives, composed from the
building blocks (`forward_image`, `forward_text`, `forward_multimodal`, `decoder_logits`) and the pure functions
of `losses/blip.py` in the order its docstring gives: {"itc", "itm", "lm"} (paper section 3.2, loss = sum).
ITC and ITM need the momentum encoders and the feature queue (`momentum_encoders=True`, or
`add_momentum_encoders()` after loading released weights, which hold none); they are parameters without
gradient (`requires_grad=False`, so optimizers and DDP skip them) updated by EMA inside `forward`, and buffers,
all in the state dict so that a resumed run continues exactly.

Deliberate differences from salesforce/BLIP `models/blip*.py`:
- one `BLIP` module serves pretraining, retrieval and captioning: a checkpoint without a part (a retrieval
  checkpoint has no decoder) loads what it has, and using the missing part fails naming it;
- released checkpoints' momentum copies and queues are not loaded (`models/convert.py` drops them):
  `add_momentum_encoders()` copies the online weights and starts a fresh queue;
- ITC's columns are the momentum features of the global batch gathered over ranks, not only this GPU's
  (`losses/blip.py`): DDP's averaged gradient then equals one process holding the whole batch;
- the ITM positives and both kinds of negatives go through the image-grounded encoder in one (3B) batch.
- the ViT is `models.vit.VisionTransformer` without CLIP's `norm_pre`, with a biased patch convolution and
  LayerNorm eps 1e-6, initialised as CLIP's (BLIP starts from DeiT/timm weights instead);
- `vision_tower="resnet"` (the `BLIP-RN-tiny` preset) puts CLIP's ResNet in the ViT's place: its attention pool
  lets every position query (`AttentionPool2d(all_tokens=True)`), so the pooled token stands first as the CLS
  token does and the grid cells follow; a tower that learns shape within the CPU demo's budget; with
  `token_stride=16` the cells after the pooled token are the third stage's (`StageTokens`), four times as many;
- generation goes through `models/generation.py`, with HuggingFace transformers 5.x's conventions (BLIP's own
  code ran transformers 4.15, whose beam search normalised scores by the length including the prompt).
"""
import contextlib
import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal import distributed
from crossmodal.config import BadInput
from crossmodal.losses.blip import (
    FeatureQueue,
    all_gather_no_grad,
    copy_params,
    diagonal_positives,
    itc_loss,
    itm_loss,
    lm_labels,
    lm_loss,
    momentum_update,
    positives_from_ids,
    sample_hard_negatives,
)
from crossmodal.models import convert, generation
from crossmodal.models.layers import KVCache
from crossmodal.models.packed import LinearPacking, linear_modules
from crossmodal.models.resnet import ModifiedResNet
from crossmodal.models.text import BertTextEncoder, LMHead
from crossmodal.models.vit import VisionTransformer


@dataclass(frozen=True)
class BLIPConfig:
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    embed_dim: int = 256
    context_length: int = 512  # BERT's learned positions
    vocab_size: int = 30524  # bert-base-uncased + [DEC] + [ENC]
    pad_id: int = 0
    eos_id: int = 102  # [SEP], the end of a caption
    dec_id: int = 30522  # [DEC], the decoder's first token (HF's bos)
    enc_id: int = 30523  # [ENC]
    drop_path: float = 0.0  # ViT stochastic depth
    vision_eps: float = 1e-6  # ViT LayerNorm eps (timm's; HuggingFace's BLIP configs say 1e-5)
    text_eps: float = 1e-12  # BERT's LayerNorm eps
    vision_mlp_ratio: float = 4.0  # MLP hidden size / width (HF configs: intermediate_size / hidden_size)
    text_mlp_ratio: float = 4.0
    text_drop: float = 0.1  # BERT's hidden and attention dropout (BLIP's configs/med_config.json)
    tie_text_decoder: bool = True
    # ITC/ITM training state (BLIP's configs/pretrain.yaml): momentum encoders with EMA `momentum` and a queue of
    # `queue_size` momentum features, a multiple of the global batch. Off for inference and released weights.
    momentum_encoders: bool = False
    momentum: float = 0.995
    queue_size: int = 57600
    itm_uniform: float = 0.0  # share of ITM negatives drawn uniformly instead of by ITC similarity (0 = BLIP)
    vision_stem: str = "patch"  # ViT stem: patch (BLIP's) | conv (models.layers.ConvStem; for training from scratch)
    # The image tower: "vit" (BLIP's) or "resnet", CLIP's ModifiedResNet with `resnet_layers` bottlenecks per stage
    # and stem width `resnet_width`, whose attention pool gives every position a token of vision_width (the
    # pooled one first, as the ViT's CLS). Not in the paper: a tower that learns shape within a CPU demo's budget.
    vision_tower: str = "vit"
    resnet_layers: tuple[int, ...] = (1, 1, 1, 1)
    resnet_width: int = 16
    # The ResNet grid whose cells are the image tokens after the pooled one: 32, the attention pool's (every cell
    # a query of the pool); 16, the third stage's, twice as fine, each cell normalised and projected to vision_width
    # by `StageTokens` (trained with BLIP, also under a locked tower). ITC reads the pooled token either way.
    token_stride: int = 32


# Paper section 4.1 and salesforce/BLIP `models/blip.py::create_vit`: ViT-B/16 or ViT-L/16 (drop-path 0.1) with
# BERT-base; ITC features of 256 dimensions.
# fmt: off
BLIP_MODELS = {
    "BLIP-base":  BLIPConfig(vision_width=768,  vision_layers=12, vision_heads=12),
    "BLIP-large": BLIPConfig(vision_width=1024, vision_layers=24, vision_heads=16, drop_path=0.1),
    # CPU demos and tests (not from the paper); a small tokenizer's vocabulary and ids replace the BERT ones. The
    # queue of 1024 divides every power-of-two global batch up to 1024.
    "BLIP-tiny":  BLIPConfig(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4, text_width=128, text_layers=3, text_heads=4, embed_dim=128, context_length=64, queue_size=1024),
    # BLIP-tiny's text side on CLIP's RN-tiny image tower (5 image tokens of width 128 at 64x64)
    "BLIP-RN-tiny": BLIPConfig(image_size=64, vision_tower="resnet", vision_width=128, text_width=128, text_layers=3, text_heads=4, embed_dim=128, context_length=64, queue_size=1024),
}
# fmt: on


OBJECTIVES = ("itc", "itm", "lm")  # paper section 3.2; finetuning trains a subset (retrieval: itc, itm; caption: lm)


class BLIP(nn.Module):
    MOMENTUM_PARTS = ("visual_encoder", "text_encoder", "vision_proj", "text_proj")  # copied as <name>_m

    def __init__(
        self,
        visual_encoder: VisionTransformer | ModifiedResNet,
        text_encoder: BertTextEncoder,
        text_decoder: BertTextEncoder,
        embed_dim: int = 256,
        pad_id: int = 0,
        eos_id: int = 102,
        dec_id: int = 30522,
        enc_id: int = 30523,
        tie_text_decoder: bool = True,
        init_temp: float = 0.07,
        tokenizer: Optional[Any] = None,
        momentum_encoders: bool = False,
        momentum: float = 0.995,
        queue_size: int = 57600,
        itm_uniform: float = 0.0,
        stage_tokens: Optional["StageTokens"] = None,
    ):
        super().__init__()
        if isinstance(visual_encoder, ModifiedResNet):
            vision_width = visual_encoder.attnpool.c_proj.out_features
        else:
            vision_width = visual_encoder.pos_embed.shape[-1]
        text_width = text_encoder.width
        vocab_size = text_encoder.embed.token_embedding.num_embeddings
        self.pad_id, self.eos_id, self.dec_id, self.enc_id = pad_id, eos_id, dec_id, enc_id
        self.tokenizer = tokenizer  # for `generate`: tokenizer(text) -> (1, T) ids, decode(ids) -> text
        self.visual_encoder = visual_encoder
        self.visual_encoder.proj = None  # CLIP's bias-free projection; BLIP projects with `vision_proj`
        self.stage_tokens = stage_tokens  # a ResNet's third-stage cells as image tokens (token_stride 16); None: the pool's
        self.text_encoder = text_encoder
        self.text_decoder = text_decoder
        if tie_text_decoder:
            text_decoder.share_all_but_self_attention(text_encoder)
        text_eps = text_encoder.embed.norm.eps  # BERT's head normalises as its layers do
        self.lm_head = LMHead(text_width, vocab_size, norm_layer=functools.partial(nn.LayerNorm, eps=text_eps))
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(init_temp))  # ITC temperature; `forward` clamps it to [0.001, 0.5]
        self.momentum = momentum
        self.itm_uniform = itm_uniform  # losses.sample_hard_negatives(uniform=...)
        self.objectives = OBJECTIVES  # what `forward` computes, of the parts the model has
        self.visual_encoder_m = self.text_encoder_m = self.vision_proj_m = self.text_proj_m = self.queue = None
        self.vision_locked = False  # `lock_vision()`
        self.linear_packing: Optional[LinearPacking] = LinearPacking()  # `packed_linears()`, for generation; None: off
        if momentum_encoders:
            self.add_momentum_encoders(momentum, queue_size)

    def add_momentum_encoders(self, momentum: float = 0.995, queue_size: int = 57600) -> None:
        """The ITC training state: EMA copies of both encoders and projections (never trained by gradient) and a
        queue of `queue_size` momentum features (0: none), after the online weights are final (built or loaded)."""
        self.momentum = momentum
        for name in self.MOMENTUM_PARTS:
            online = self.part(name)
            setattr(self, f"{name}_m", copy.deepcopy(online))
            copy_params(online.parameters(), getattr(self, f"{name}_m").parameters())
            if hasattr(online, "set_grad_checkpointing"):  # the copies run without gradient
                getattr(self, f"{name}_m").set_grad_checkpointing(False)
        self.queue = FeatureQueue(self.vision_proj.out_features, queue_size).to(self.temp.device)

    def lock_vision(self) -> None:
        """Freeze the image tower (a pretrained one; LiT's "locked image tower"): no gradient, and eval mode whatever
        `train()` says, so BatchNorm keeps its running statistics. Its momentum copy is then the tower itself:
        ITC's momentum image features come from the online image tokens and only `vision_proj_m` follows by EMA."""
        self.vision_locked = True
        for name in ("visual_encoder", "visual_encoder_m"):
            if getattr(self, name) is not None:
                getattr(self, name).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "BLIP":
        super().train(mode)
        if self.vision_locked:
            for name in ("visual_encoder", "visual_encoder_m"):
                if getattr(self, name) is not None:
                    getattr(self, name).eval()
        return self

    def part(self, name: str) -> nn.Module:
        """The submodule `name`, or an error saying that the checkpoint loaded into this model had none."""
        module = getattr(self, name)
        if module is None:
            raise RuntimeError(f"this BLIP has no {name}: the checkpoint it was loaded from holds none")
        return module

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for name in ("visual_encoder", "text_encoder", "text_decoder"):
            if getattr(self, name) is not None:
                getattr(self, name).set_grad_checkpointing(enable)

    # ---------------------------------------------------------------- building blocks

    def forward_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> image tokens (B, 1 + HW, vision_width), CLS first."""
        if self.stage_tokens is None:
            return tower_tokens(self.visual_encoder, images)
        stage3, stage4 = self.visual_encoder.forward_stages(images)
        pooled = self.visual_encoder.attnpool(stage4)  # (B, vision_width), the tower's embedding
        return torch.cat([pooled[:, None], self.stage_tokens(stage3)], dim=1)  # (B, 1 + H/16 * W/16, vision_width)

    def forward_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unimodal text encoder: (B, T) ids, [CLS] first, pad_id after the text -> (B, T, text_width)."""
        return self.part("text_encoder")(tokens, padding_mask=tokens != self.pad_id)

    def forward_multimodal(self, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image-grounded text encoder: the first token becomes [ENC] -> (B, T, text_width)."""
        padding_mask = tokens != self.pad_id
        tokens = torch.cat([torch.full_like(tokens[:, :1], self.enc_id), tokens[:, 1:]], dim=1)
        return self.part("text_encoder")(tokens, padding_mask=padding_mask, context=image_tokens)

    def decoder_logits(self, tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image-grounded decoder: the first token becomes [DEC]; logits (B, T, vocab) predict the next tokens."""
        padding_mask = tokens != self.pad_id
        tokens = torch.cat([torch.full_like(tokens[:, :1], self.dec_id), tokens[:, 1:]], dim=1)
        return self.decode(tokens, image_tokens, padding_mask=padding_mask)

    def decode(
        self,
        tokens: torch.Tensor,
        image_tokens: torch.Tensor,
        cache: Optional[KVCache] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Decoder logits (B, T, vocab) for tokens taken as they are ([DEC] first, or the ones after `cache`)."""
        decoder = self.part("text_decoder")
        x = decoder(tokens, padding_mask=padding_mask, context=image_tokens, is_causal=True, cache=cache)
        return self.part("lm_head")(x, decoder.embed.token_embedding.weight)  # (B, T, vocab)

    # ---------------------------------------------------------------- training objectives

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        image_ids: Optional[torch.Tensor] = None,
        alpha: float = 0.4,
        prompt_length: int | torch.Tensor = 0,
        decoder_tokens: Optional[torch.Tensor] = None,
        itm_uniform: Optional[float] = None,
        swapped: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> dict[str, torch.Tensor]:
        """BLIP's training losses {"itc", "itm", "lm"} (scalars, to be summed) of this rank's batch.

        images (B, 3, H, W); tokens (B, T) tokenizer ids ([CLS] first, pad_id after the text), the same captions
        for all three objectives as in BLIP's pretraining. image_ids (B,) >= 0: captions of one image are all
        ITC positives and never ITM negatives (retrieval finetuning); None: the pairs themselves (pretraining).
        alpha: momentum-distillation weight, ramped by the caller (`losses.alpha_ramp`). prompt_length: leading
        decoder tokens ([DEC] included) the LM loss skips, 4 for caption finetuning on "a picture of " (BLIP), or
        (B,) one per row. decoder_tokens (B, T'): the decoder's sequences when they are not the captions (rows
        that are "question: q answer: a" with the question as their prompt); None: the captions. itm_uniform: the share
        of ITM negatives drawn uniformly this step (None: `self.itm_uniform`; train.py ramps it). swapped: (indices
        (S,), tokens (S, T)), captions of those images with attributes exchanged between objects, which ITM also
        learns as non-matches (NegCLIP's hard negatives; blip.swap_negatives).
        Computes `self.objectives` (all three unless set otherwise) of those the model has parts for: a model
        without a text encoder (a captioning checkpoint) gives only "lm"; one without a decoder (a retrieval
        checkpoint) only "itc" and "itm". ITM needs ITC's similarities: "itm" computes "itc" too. Each call with
        ITC updates the momentum encoders and the queue, and clamps `temp` in place (as BLIP): run backward before
        the next call. tokens may be None when only "lm" runs on decoder_tokens.
        """
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_tokens = self.forward_image(images)  # (B, 1 + HW, vision_width)
        losses = {}
        if self.text_encoder is not None and ("itc" in self.objectives or "itm" in self.objectives):
            uniform = self.itm_uniform if itm_uniform is None else itm_uniform
            losses.update(self.itc_itm_losses(image_tokens, images, tokens, image_ids, alpha, uniform, swapped))
        if self.text_decoder is not None and "lm" in self.objectives:
            decoder_tokens = tokens if decoder_tokens is None else decoder_tokens
            logits = self.decoder_logits(decoder_tokens, image_tokens)  # (B, T, vocab), [DEC] first
            losses["lm"] = lm_loss(logits, lm_labels(decoder_tokens, self.pad_id, prompt_length))  # smoothing 0.1
        return losses

    def itc_itm_losses(
        self,
        image_tokens: torch.Tensor,
        images: torch.Tensor,
        tokens: torch.Tensor,
        image_ids: Optional[torch.Tensor],
        alpha: float,
        itm_uniform: float = 0.0,
        swapped: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> dict[str, torch.Tensor]:
        """ITC with momentum distillation and the queue, then ITM on hard negatives (losses/blip.py's order), and on
        the `swapped` captions of their images where given (see forward)."""
        if self.queue is None:
            raise RuntimeError("ITC/ITM need the momentum encoders: build with momentum_encoders=True, or call "
                               "model.add_momentum_encoders() after loading released weights")
        batch_size = tokens.shape[0]
        image_feat = F.normalize(self.vision_proj(image_tokens[:, 0]), dim=-1)  # (B, D)
        text_feat = F.normalize(self.text_proj(self.forward_text(tokens)[:, 0]), dim=-1)  # (B, D)
        with torch.no_grad():
            momentum_update(self.momentum_pairs(online=True), self.momentum_pairs(online=False), self.momentum)
            # a locked tower is its own momentum copy (exactly: an EMA of equal weights can move them by rounding)
            cls_m = image_tokens[:, 0] if self.vision_locked else tower_tokens(self.visual_encoder_m, images)[:, 0]
            image_feat_m = F.normalize(self.vision_proj_m(cls_m), dim=-1)
            text_states_m = self.text_encoder_m(tokens, padding_mask=tokens != self.pad_id)  # (B, T, text_width)
            text_feat_m = F.normalize(self.text_proj_m(text_states_m[:, 0]), dim=-1)  # (B, D)
            image_feat_m_all, text_feat_m_all = all_gather_no_grad(image_feat_m), all_gather_no_grad(text_feat_m)
        positives = None  # the diagonal at this rank's offset
        if image_ids is not None:
            positives = positives_from_ids(image_ids, torch.cat([all_gather_no_grad(image_ids), self.queue.idx_queue[0]]))
        loss_itc = itc_loss(
            image_feat, text_feat, image_feat_m_all, text_feat_m_all, self.queue.image_queue, self.queue.text_queue,
            self.temp, alpha, offset=distributed.rank() * batch_size, positives=positives,
        )  # fmt: skip
        self.queue.enqueue(image_feat_m, text_feat_m, image_ids)
        if "itm" not in self.objectives:
            return {"itc": loss_itc}

        # ITM: one hard negative text per image and one image per text, from this rank's batch, drawn with the
        # global RNG (reproducible from the seed the loop sets), never a caption of the same image
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):  # logits up to 1000: float32
            sim_i2t = image_feat.float() @ text_feat_m.float().T / self.temp  # (B, B)
            sim_t2i = text_feat.float() @ image_feat_m.float().T / self.temp  # (B, B)
        if image_ids is None:
            local_positives = diagonal_positives(batch_size, batch_size, device=tokens.device)
        else:
            local_positives = positives_from_ids(image_ids, image_ids)
        neg_text, neg_image = sample_hard_negatives(sim_i2t, sim_t2i, local_positives, uniform=itm_uniform)
        # rows: B positives, B (text_i, negative image), B (negative text, image_i), as BLIP
        itm_tokens = torch.cat([tokens, tokens, tokens[neg_text]])  # (3B, T)
        itm_images = torch.cat([image_tokens, image_tokens[neg_image], image_tokens])  # (3B, 1 + HW, vision_width)
        if swapped is not None:  # then S rows (swapped caption, its image), negatives too
            index, swapped_tokens = swapped
            itm_tokens, itm_images = torch.cat([itm_tokens, swapped_tokens]), torch.cat([itm_images, image_tokens[index]])
        logits = self.itm_head(self.forward_multimodal(itm_tokens, itm_images)[:, 0])  # (3B, 2)
        return {"itc": loss_itc, "itm": itm_loss(logits[:batch_size], logits[batch_size:])}

    def momentum_pairs(self, online: bool) -> list[torch.Tensor]:
        """The online parameters of MOMENTUM_PARTS, or their momentum copies in the same order."""
        suffix = "" if online else "_m"
        parts = [name for name in self.MOMENTUM_PARTS if not (self.vision_locked and name == "visual_encoder")]
        return [param for name in parts for param in getattr(self, name + suffix).parameters()]

    # ---------------------------------------------------------------- inference

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """ITC image features (B, embed_dim)."""
        cls_token = self.forward_image(images)[:, 0]  # (B, vision_width)
        features = self.part("vision_proj")(cls_token)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """ITC text features (B, embed_dim) of BERT-tokenized texts ([CLS] first, pad_id padding)."""
        cls_token = self.forward_text(tokens)[:, 0]  # (B, text_width)
        features = self.part("text_proj")(cls_token)
        return F.normalize(features, dim=-1) if normalize else features

    def itm_logits(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Image-text matching logits (B, 2) of pairs (images[i], tokens[i]); index 1 = match."""
        enc_token = self.forward_multimodal(tokens, self.forward_image(images))[:, 0]  # (B, text_width)
        return self.part("itm_head")(enc_token)

    def packed_linears(self) -> contextlib.AbstractContextManager:
        """Inside: on a CPU, the image tower's, the decoder's and the output layer's products run on the few-row
        kernel or oneDNN (models/packed.py): decoding's products 3-4x faster than MKL's; `self.linear_packing = None`
        turns it off."""
        if self.linear_packing is None:
            return contextlib.nullcontext()
        lm_head = self.part("lm_head")  # its F.linear on the tied embedding too
        return self.linear_packing(linear_modules(self.visual_encoder, self.part("text_decoder"), lm_head) + [lm_head])

    @torch.no_grad()
    def generate_ids(
        self,
        images: torch.Tensor,
        prompt_ids: Sequence[int],
        num_beams: int = 3,
        max_length: int = 20,
        min_length: int = 5,
        **options: Any,
    ) -> torch.Tensor:
        """Token ids (B, L), prompt included, for the prompt ids ([DEC] first). Lengths count the prompt;
        `options` are those of `models.generation.generate` (top_p, top_k, temperature, repetition_penalty,
        length_penalty, generator, use_cache)."""
        decoder = self.part("text_decoder")
        with self.packed_linears():
            image_tokens = self.forward_image(images)  # (B, 1 + HW, vision_width)
            prompt = torch.tensor(list(prompt_ids), device=images.device).expand(images.shape[0], -1)  # (B, P)
            return generation.generate(
                self.decode,
                prompt,
                image_tokens,
                num_layers=decoder.transformer.depth,
                eos_id=self.eos_id,
                pad_id=self.pad_id,
                max_length=max_length,
                min_length=min_length,
                num_beams=num_beams,
                **options,
            )

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompt: str = "a picture of ",
        num_beams: int = 3,
        max_length: int = 20,
        min_length: int = 5,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        top_k: int = 50,
        **options: Any,
    ) -> list[str]:
        """Captions without the prompt. BLIP's settings: beam search `num_beams=3, max_length=20, min_length=5`;
        nucleus sampling `top_p=0.9, repetition_penalty=1.1` (with HF's default top_k=50, as BLIP ran it).
        Lengths count the prompt's tokens ([DEC] included), as in BLIP and HF."""
        if self.tokenizer is None:
            raise RuntimeError("generate needs model.tokenizer (a BertTokenizer); set it or use generate_ids")
        row = self.tokenizer(prompt)[0].tolist()  # [CLS] prompt [SEP] [PAD]...
        prompt_ids = [self.dec_id, *row[1 : row.index(self.eos_id)]]  # BLIP: [CLS] -> [DEC], no [SEP]
        if top_p is not None:
            options.update(top_p=top_p, top_k=top_k)
        ids = self.generate_ids(
            images,
            prompt_ids,
            num_beams=num_beams,
            max_length=max_length,
            min_length=min_length,
            repetition_penalty=repetition_penalty,
            **options,
        )
        captions = []
        for row in ids[:, len(prompt_ids) :].tolist():
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            captions.append(self.tokenizer.decode([token for token in row if token != self.pad_id]))
        return captions


def token_stride_problem(token_stride: int, vision_tower: str) -> Optional[str]:
    """Why image tokens at `token_stride` cannot come from a `vision_tower`, or None (BLIPConfig.token_stride)."""
    if token_stride not in (32, 16) or (token_stride == 16 and vision_tower != "resnet"):
        return (f"token_stride must be 32 (the image tower's own tokens) or 16 (a ResNet tower's third stage); "
                f"got {token_stride} with vision_tower={vision_tower!r}")
    return None


class StageTokens(nn.Module):
    """A ResNet's third-stage cells (B, HW, channels) as image tokens (B, HW, width): LayerNorm, a linear map and a
    learned position per cell (`token_stride=16`: 16 cells at 64x64 where the attention pool gives 4, so that the
    image-grounded encoder can tell which object is where; not in BLIP, whose ViT gives one token per patch)."""

    def __init__(self, channels: int, cells: int, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, width)
        self.positional_embedding = nn.Parameter(torch.randn(cells, width) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(features)) + self.positional_embedding


def tower_tokens(encoder: VisionTransformer | ModifiedResNet, images: torch.Tensor) -> torch.Tensor:
    """An image tower's tokens (B, 1 + HW, width), the one ITC reads first."""
    if isinstance(encoder, ModifiedResNet):
        return encoder.forward_tokens(images)
    return encoder.forward_features(images)


def build_blip(config: BLIPConfig, tokenizer: Optional[Any] = None) -> BLIP:
    """A `BLIP` from a config; a tokenizer of `data.tokenizer` (BertTokenizer, or SentencePieceTokenizer trained
    with BLIP's tokens) sets the vocabulary size and the pad, eos, [DEC] and [ENC] ids."""
    if tokenizer is not None:
        ids = {name: getattr(tokenizer, name) for name in ("vocab_size", "pad_id", "eos_id", "dec_id", "enc_id")}
        if ids["dec_id"] is None or ids["enc_id"] is None:
            raise ValueError("the tokenizer has no [DEC]/[ENC] tokens (a sentencepiece model needs blip_tokens)")
        config = dataclasses.replace(config, **ids)
    text_norm = functools.partial(nn.LayerNorm, eps=config.text_eps)

    def text_transformer() -> BertTextEncoder:
        return BertTextEncoder(
            vocab_size=config.vocab_size,
            context_length=config.context_length,
            width=config.text_width,
            depth=config.text_layers,
            num_heads=config.text_heads,
            mlp_ratio=config.text_mlp_ratio,
            context_dim=config.vision_width,
            norm_layer=text_norm,
            drop=config.text_drop,
            attn_drop=config.text_drop,
        )

    if config.vision_tower not in ("vit", "resnet"):
        raise ValueError(f"vision_tower must be vit or resnet, got {config.vision_tower!r}")
    if config.vision_tower == "resnet" and config.vision_stem != "patch":
        raise ValueError(f"vision_stem={config.vision_stem!r} is a ViT option; this preset has a ResNet image tower")
    problem = token_stride_problem(config.token_stride, config.vision_tower)
    if problem:
        raise ValueError(problem)
    stage_tokens = None
    if config.token_stride == 16:
        stage_tokens = StageTokens(config.resnet_width * 16, (config.image_size // 16) ** 2, config.vision_width)
    if config.vision_tower == "resnet":
        visual_encoder = ModifiedResNet(
            layers=config.resnet_layers,
            output_dim=config.vision_width,
            heads=config.resnet_width * 32 // 64,  # CLIP's: head width 64
            image_size=config.image_size,
            width=config.resnet_width,
        )
    else:
        visual_encoder = VisionTransformer(
            image_size=config.image_size,
            patch_size=config.patch_size,
            width=config.vision_width,
            depth=config.vision_layers,
            num_heads=config.vision_heads,
            mlp_ratio=config.vision_mlp_ratio,
            norm_layer=functools.partial(nn.LayerNorm, eps=config.vision_eps),
            drop_path=config.drop_path,
            norm_pre=False,
            patch_bias=True,
            stem=config.vision_stem,
        )
    return BLIP(
        visual_encoder,
        text_transformer(),
        text_transformer(),
        embed_dim=config.embed_dim,
        pad_id=config.pad_id,
        eos_id=config.eos_id,
        dec_id=config.dec_id,
        enc_id=config.enc_id,
        tie_text_decoder=config.tie_text_decoder,
        tokenizer=tokenizer,
        momentum_encoders=config.momentum_encoders,
        momentum=config.momentum,
        queue_size=config.queue_size,
        itm_uniform=config.itm_uniform,
        stage_tokens=stage_tokens,
    )


# ---------------------------------------------------------------- HuggingFace BLIP folders
#
# transformers' BlipConfig (config.json), section by section: the fields read, with transformers' defaults, for
# save_pretrained may leave out a value equal to its default (the text stack's 8 heads, where BERT-base and the
# BLIP presets have 12), and the fields ignored on purpose, which change nothing the weights compute. Any other
# field is refused (`convert.check_hf_fields`).
HF_BLIP_READ = {
    "": {"image_text_hidden_size": 256, "tie_word_embeddings": True, "text_config": {}, "vision_config": {}},
    "text_config": {
        "vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 8,
        "intermediate_size": 3072, "max_position_embeddings": 512, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
        "is_decoder": True, "tie_word_embeddings": True, "pad_token_id": 0, "bos_token_id": 30522, "sep_token_id": 102,
    },
    "vision_config": {
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "image_size": 384, "patch_size": 16, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    },
}  # fmt: skip
HF_BLIP_IGNORED = {
    # BlipModel's contrastive projection (no part of the captioning and retrieval models) and initialisation;
    # label_smoothing is the training loss's
    "": ("projection_dim", "logit_scale_init_value", "initializer_factor", "initializer_range", "label_smoothing"),
    # transformers sets encoder_hidden_size to the vision width, which is what the cross-attention reads here too;
    # the text model uses no projection_dim; dropout and smoothing act in training only; captions end at
    # sep_token_id, not eos_token_id; BERT's add_cross_attention and its kin are not read by BLIP's text model
    # (its cross-attention follows is_decoder)
    "text_config": (
        "encoder_hidden_size", "projection_dim", "hidden_dropout_prob", "attention_probs_dropout_prob",
        "initializer_range", "initializer_factor", "label_smoothing", "eos_token_id", "use_cache",
        "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
    ),
    # PretrainedConfig's text options, which a vision model does not read
    "vision_config": (
        "projection_dim", "attention_dropout", "dropout", "initializer_range", "initializer_factor", "is_decoder",
        "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "tie_word_embeddings",
        "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    ),
}  # fmt: skip
# The BLIPConfig fields a folder sets that a train.py run cannot carry, and the config.json fields they come from
# (a run records only the preset's name; image size, vocabulary and token ids are its data's and tokenizer's).
FOLDER_ARCHITECTURE = {
    "vision_tower": "its image tower", "patch_size": "vision_config.patch_size",
    "vision_width": "vision_config.hidden_size", "vision_layers": "vision_config.num_hidden_layers",
    "vision_heads": "vision_config.num_attention_heads",
    "vision_mlp_ratio": "vision_config.intermediate_size / hidden_size", "vision_eps": "vision_config.layer_norm_eps",
    "text_width": "text_config.hidden_size", "text_layers": "text_config.num_hidden_layers",
    "text_heads": "text_config.num_attention_heads", "text_mlp_ratio": "text_config.intermediate_size / hidden_size",
    "text_eps": "text_config.layer_norm_eps", "context_length": "text_config.max_position_embeddings",
    "embed_dim": "image_text_hidden_size",
}  # fmt: skip


def _square(section: dict, key: str, where: str) -> int:
    """transformers' image_size / patch_size: an int or a square [h, w]."""
    value = section[key]
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    return convert.hf_size({key: value}, key, where)


def blip_config_from_hf(config: dict, where: str, tokenizer: Optional[Any] = None) -> dict[str, Any]:
    """`BLIPConfig` fields from a HuggingFace BLIP config.json (`where` names the file in errors): every architecture
    field is built as the file says (transformers' default where it says nothing), one this model cannot be is
    refused naming it, and so is an unknown one. tokenizer: its vocabulary size and pad, [SEP] and [DEC] ids must
    be the file's."""
    sections = {"": config, "text_config": config.get("text_config") or {}, "vision_config": config.get("vision_config") or {}}
    read = {}
    for name, section in sections.items():
        label = f"{where} {name}" if name else where
        if not isinstance(section, dict):
            raise BadInput(f"{label}: a JSON object expected, got {section!r}")
        convert.check_hf_fields(section, HF_BLIP_READ[name], HF_BLIP_IGNORED[name], label)
        read[name] = {key: section.get(key, default) for key, default in HF_BLIP_READ[name].items()}
    top, text, vision = read[""], read["text_config"], read["vision_config"]
    text_where, vision_where = f"{where} text_config", f"{where} vision_config"
    for section, label in ((text, text_where), (vision, vision_where)):
        if section["hidden_act"] != "gelu":
            raise BadInput(f"{label}: hidden_act={section['hidden_act']!r}: BLIP's layers here compute GELU "
                           f"(transformers' 'gelu') only")
        width, heads = (convert.hf_size(section, key, label) for key in ("hidden_size", "num_attention_heads"))
        if width % heads:
            raise BadInput(f"{label}: hidden_size={width} is not a multiple of num_attention_heads={heads}")
    if text["is_decoder"] is not True:
        raise BadInput(f"{text_where}: is_decoder={text['is_decoder']!r}: BLIP's text blocks cross-attend to the "
                       f"image (transformers builds that part only with is_decoder true)")
    if not (top["tie_word_embeddings"] or text["tie_word_embeddings"]):
        raise BadInput(f"{where}: tie_word_embeddings=false (top level and text_config): the decoder's output matrix "
                       f"here is its word embedding matrix")
    if vision["num_channels"] != 3:
        raise BadInput(f"{vision_where}: num_channels={vision['num_channels']!r}: the image tower takes RGB images (3)")
    fields = dict(
        vision_tower="vit",
        image_size=_square(vision, "image_size", vision_where),
        patch_size=_square(vision, "patch_size", vision_where),
        vision_width=vision["hidden_size"],
        vision_layers=convert.hf_size(vision, "num_hidden_layers", vision_where),
        vision_heads=vision["num_attention_heads"],
        vision_mlp_ratio=convert.hf_ratio(vision["hidden_size"], convert.hf_size(vision, "intermediate_size", vision_where),
                                          "intermediate_size", vision_where),
        vision_eps=convert.hf_number(vision, "layer_norm_eps", vision_where, 1e-5),
        text_width=text["hidden_size"],
        text_layers=convert.hf_size(text, "num_hidden_layers", text_where),
        text_heads=text["num_attention_heads"],
        text_mlp_ratio=convert.hf_ratio(text["hidden_size"], convert.hf_size(text, "intermediate_size", text_where),
                                        "intermediate_size", text_where),
        text_eps=convert.hf_number(text, "layer_norm_eps", text_where, 1e-12),
        context_length=convert.hf_size(text, "max_position_embeddings", text_where),
        vocab_size=convert.hf_size(text, "vocab_size", text_where),
        embed_dim=convert.hf_size(top, "image_text_hidden_size", where),
    )
    # The ids transformers' BLIP decodes with (null ones it cannot use either); it names no [ENC], which BLIP's
    # tokenizer appends last, after [DEC].
    ids = {"pad_id": "pad_token_id", "eos_id": "sep_token_id", "dec_id": "bos_token_id"}
    fields.update({ours: text[theirs] for ours, theirs in ids.items() if text[theirs] is not None})
    fields["enc_id"] = fields["vocab_size"] - 1
    if tokenizer is not None:
        names = {"vocab_size": "vocab_size", **ids}
        for ours, theirs in names.items():
            if ours in fields and fields[ours] != getattr(tokenizer, ours):
                raise BadInput(f"{text_where}: {theirs}={fields[ours]}, but the tokenizer's {ours} is "
                               f"{getattr(tokenizer, ours)} (another vocab.txt?)")
    return fields


def preset_differences(preset: BLIPConfig, fields: dict[str, Any]) -> list[str]:
    """'field=folder value (the preset's value)' for each of FOLDER_ARCHITECTURE in which a folder's fields
    (`blip_config_from_hf`) differ from a preset."""
    return [f"{name}={fields[key]!r} (the preset's {getattr(preset, key)!r})" for key, name in FOLDER_ARCHITECTURE.items()
            if key in fields and fields[key] != getattr(preset, key)]
