"""BLIP: bootstrapping language-image pre-training (Li et al., ICML 2022, arXiv 2201.12086).

A ViT image encoder and a BERT-style text transformer used three ways ("MED", paper section 3.1): the unimodal
text encoder ([CLS] first) gives the image-text contrastive (ITC) features through `vision_proj`/`text_proj`; the
image-grounded encoder ([ENC] first, cross-attending the image tokens) feeds the image-text matching (ITM) head;
the image-grounded decoder ([DEC] first, causal) is the captioner. With `tie_text_decoder` the decoder shares all
but its self-attention with the encoder, as in BLIP's pretraining (paper Table 3).

The building blocks (`forward_image`, `forward_text`, `forward_multimodal`, `decoder_logits`, the heads and
`temp`) are what the training objectives of `losses/blip.py` compose; the training `forward` that returns
their named losses is wired with them.

Deliberate differences from salesforce/BLIP `models/blip*.py`:
- one `BLIP` module serves pretraining, retrieval and captioning: a checkpoint without a part (a retrieval
  checkpoint has no decoder) loads what it has, and using the missing part fails naming it;
- no momentum encoders or queues here (training state, with the losses); checkpoints' copies are ignored;
- the ViT is `models.vit.VisionTransformer` without CLIP's `norm_pre`, with a biased patch convolution and
  LayerNorm eps 1e-6, initialised as CLIP's (BLIP starts from DeiT/timm weights instead);
- generation goes through `models/generation.py`, with HuggingFace transformers 5.x's conventions (BLIP's own
  code ran transformers 4.15, whose beam search normalised scores by the length including the prompt).
"""
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models import generation
from models.layers import KVCache
from models.text import BertTextEncoder, LMHead
from models.vit import VisionTransformer


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
    text_drop: float = 0.1  # BERT's hidden and attention dropout (BLIP's configs/med_config.json)
    tie_text_decoder: bool = True


# Paper section 4.1 and salesforce/BLIP `models/blip.py::create_vit`: ViT-B/16 or ViT-L/16 (drop-path 0.1) with
# BERT-base; ITC features of 256 dimensions.
# fmt: off
BLIP_MODELS = {
    "BLIP-base":  BLIPConfig(vision_width=768,  vision_layers=12, vision_heads=12),
    "BLIP-large": BLIPConfig(vision_width=1024, vision_layers=24, vision_heads=16, drop_path=0.1),
    # CPU demos and tests (not from the paper); a small tokenizer's vocabulary and ids replace the BERT ones.
    "BLIP-tiny":  BLIPConfig(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4, text_width=128, text_layers=3, text_heads=4, embed_dim=128, context_length=64),
}
# fmt: on


class BLIP(nn.Module):
    def __init__(
        self,
        visual_encoder: VisionTransformer,
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
    ):
        super().__init__()
        vision_width = visual_encoder.pos_embed.shape[-1]
        text_width = text_encoder.width
        vocab_size = text_encoder.embed.token_embedding.num_embeddings
        self.pad_id, self.eos_id, self.dec_id, self.enc_id = pad_id, eos_id, dec_id, enc_id
        self.tokenizer = tokenizer  # for `generate`: tokenizer(text) -> (1, T) ids, decode(ids) -> text
        self.visual_encoder = visual_encoder
        self.visual_encoder.proj = None  # CLIP's bias-free projection; BLIP projects with `vision_proj`
        self.text_encoder = text_encoder
        self.text_decoder = text_decoder
        if tie_text_decoder:
            text_decoder.share_all_but_self_attention(text_encoder)
        self.lm_head = LMHead(text_width, vocab_size, norm_layer=functools.partial(nn.LayerNorm, eps=1e-12))
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(init_temp))  # ITC temperature; the losses clamp it to [0.001, 0.5]

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
        return self.visual_encoder.forward_features(images)

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
        image_tokens = self.forward_image(images)  # (B, 1 + HW, vision_width)
        prompt = torch.tensor(list(prompt_ids), device=images.device).expand(images.shape[0], -1)  # (B, P)
        return generation.generate(
            self.decode,
            prompt,
            image_tokens,
            num_layers=self.part("text_decoder").transformer.depth,
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


def build_blip(config: BLIPConfig, tokenizer: Optional[Any] = None) -> BLIP:
    """A `BLIP` from a config; a tokenizer of `data.tokenizer` (BertTokenizer, or SentencePieceTokenizer trained
    with BLIP's tokens) sets the vocabulary size and the pad, eos, [DEC] and [ENC] ids."""
    if tokenizer is not None:
        ids = {name: getattr(tokenizer, name) for name in ("vocab_size", "pad_id", "eos_id", "dec_id", "enc_id")}
        if ids["dec_id"] is None or ids["enc_id"] is None:
            raise ValueError("the tokenizer has no [DEC]/[ENC] tokens (a sentencepiece model needs blip_tokens)")
        config = dataclasses.replace(config, **ids)
    text_norm = functools.partial(nn.LayerNorm, eps=1e-12)

    def text_transformer() -> BertTextEncoder:
        return BertTextEncoder(
            vocab_size=config.vocab_size,
            context_length=config.context_length,
            width=config.text_width,
            depth=config.text_layers,
            num_heads=config.text_heads,
            context_dim=config.vision_width,
            norm_layer=text_norm,
            drop=config.text_drop,
            attn_drop=config.text_drop,
        )

    visual_encoder = VisionTransformer(
        image_size=config.image_size,
        patch_size=config.patch_size,
        width=config.vision_width,
        depth=config.vision_layers,
        num_heads=config.vision_heads,
        norm_layer=functools.partial(nn.LayerNorm, eps=config.vision_eps),
        drop_path=config.drop_path,
        norm_pre=False,
        patch_bias=True,
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
    )
