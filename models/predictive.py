"""The CLIP paper's predictive baselines (Radford et al., 2021, section 2.3 and figure 2): an image tower trained
to predict the text paired with each image, where CLIP trains it to pick that text out of a batch.

- `caption`: the exact words, one at a time. The paper's baseline trained an image CNN and a text transformer
  from scratch to predict the caption (as VirTex, Desai & Johnson, 2021). Here the text side is CLIP's causal
  text tower: its first token (bos) also carries the image embedding, projected to the text width, and every
  position predicts the next token through the output matrix tied to the token embedding (next-token
  cross-entropy over the caption, pads left out).
- `bow`: the caption's bag of words. A linear layer maps the image embedding to vocabulary logits; a softmax is
  trained against the caption's token counts normalised to sum to 1 (bos, eos and pads left out). The paper
  does not say how its bag-of-words target was encoded; this is the multi-label softmax of Joulin et al. (2016)
  and Mahajan et al. (2018), which the paper cites for the approach.

Zero-shot classification (eval.zeroshot) scores every class prompt by `log_likelihoods`: the mean log-probability
per token of its words given the image, averaged over the prompt templates; the highest-scoring class wins.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from crossmodal.losses import lm_labels, lm_loss
from crossmodal.models.text import TextTransformer, text_lengths

OBJECTIVES = ("caption", "bow")


class TextPredictor(nn.Module):
    def __init__(self, visual: nn.Module, objective: str, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                 text: Optional[TextTransformer] = None):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
        if objective == "caption" and text is None:
            raise ValueError("the caption objective needs a text tower to decode with")
        self.objective = objective
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.vocab_size = vocab_size
        self.visual = visual
        if objective == "caption":
            self.text = text
            self.text.proj = None  # CLIP's pooled-embedding projection: a caption decoder predicts every token
            self.image_proj = nn.Linear(visual.output_dim, text.token_embedding.embedding_dim)
        else:
            self.bow_head = nn.Linear(visual.output_dim, vocab_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if self.objective == "caption":
            self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)  # (B, embed_dim)
        return F.normalize(features, dim=-1) if normalize else features

    def caption_logits(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, D) image features, (B, T) tokens -> (B, T, V) next-token logits (position t predicts token t + 1)."""
        hidden = self.text.forward_features(tokens, first=self.image_proj(features))  # (B, T, width)
        return hidden @ self.text.token_embedding.weight.T

    def word_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) True at the caption's words: not bos, eos or pad."""
        return (tokens != self.pad_id) & (tokens != self.bos_id) & (tokens != self.eos_id)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images (B, 3, H, W) and their captions (B, T) -> {objective: loss}, the mean over the batch."""
        features = self.visual(images)  # (B, D)
        if self.objective == "caption":
            tokens = tokens[:, : int(text_lengths(tokens, self.pad_id).max())]  # no position sees the trailing pads
            logits = self.caption_logits(features, tokens)
            return {"caption": lm_loss(logits, lm_labels(tokens, self.pad_id), label_smoothing=0.0)}
        words = self.word_mask(tokens)
        log_probs = F.log_softmax(full_precision(self.bow_head(features)), dim=-1)  # (B, V)
        counts = torch.zeros_like(log_probs).scatter_add_(1, tokens, words.to(log_probs.dtype))  # (B, V) word counts
        target = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        return {"bow": -(target * log_probs).sum(-1).mean()}

    @torch.no_grad()
    def log_likelihoods(self, features: torch.Tensor, tokens: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """(B, D) image features, (M, T) texts -> (B, M): each text's mean log-probability per token given each image
        (captions: its tokens after bos, eos included; bags of words: its words, without bos and eos)."""
        if self.objective == "bow":
            log_probs = F.log_softmax(full_precision(self.bow_head(features)), dim=-1)  # (B, V)
            words = self.word_mask(tokens).to(log_probs.dtype)  # (M, T)
            per_token = log_probs[:, tokens]  # (B, M, T)
            return (per_token * words).sum(-1) / words.sum(-1).clamp_min(1)
        tokens = tokens[:, : int(text_lengths(tokens, self.pad_id).max())]
        labels = lm_labels(tokens, self.pad_id)[:, 1:]  # (M, T-1)
        labelled = labels != -100
        scores = []
        for image_features in features.split(chunk):  # every image against every text
            batch = image_features.repeat_interleave(len(tokens), dim=0)  # (b * M, D)
            logits = self.caption_logits(batch, tokens.repeat(len(image_features), 1))[:, :-1]
            targets = labels.clamp_min(0).repeat(len(image_features), 1)[..., None]  # (b * M, T-1, 1)
            log_probs = full_precision(logits).log_softmax(-1).gather(-1, targets)
            log_probs = log_probs.view(len(image_features), *labels.shape)  # (b, M, T-1)
            scores.append((log_probs * labelled).sum(-1) / labelled.sum(-1).clamp_min(1))
        return torch.cat(scores)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Logits for a softmax over the vocabulary: fp32 under bf16 autocast, fp64 kept (the tests' gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()
