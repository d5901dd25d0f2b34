"""Video CLIP: an image CLIP applied to the frames of a clip, its frame features pooled over time (CLIP4Clip, Luo et
al., Neurocomputing 2022, "CLIP4Clip: An Empirical Study of CLIP for End to End Video Clip Retrieval").

`VideoCLIP` wraps a `models.clip.CLIP`: the image tower encodes every frame, and `pool` turns a clip's frame
features into one video feature:
- `mean`: the average of the L2-normalised frame features (CLIP4Clip's parameter-free meanP);
- `transformer`: CLIP4Clip's seqTransf: learned frame position embeddings are added, a small temporal Transformer
  (the shared `models.layers.Transformer`, width embed_dim) runs over the frames, and its output is added
  residually to the frame features before they are normalised again and averaged. Unlike meanP it sees frame order,
  so it can tell "moves left, then turns red" from "turns red, then moves left".
The text tower and the temperature are the CLIP's, and `forward` returns what CLIP's does (video features under
`image_features`), so the contrastive losses and `recipes.base.contrastive_step` apply unchanged.

Deliberate differences from CLIP4Clip's `modules/modeling.py` (`_loose_similarity`, sim_header=seqTransf):
- the temporal Transformer's output passes a LayerNorm and a zero-initialised projection (`TemporalTransformer.
  proj`) before the residual, so at initialisation `transformer` pools exactly as `mean` does and a run that
  starts from an image CLIP loses nothing. CLIP4Clip instead copies the first layers of CLIP's text Transformer
  and its position embeddings into the temporal module, which changes the features at step 0;
- the temporal module reads each frame's difference from the clip's mean frame, layer-normalised (CLIP4Clip: the
  raw frame features). Frames of one clip share most of their feature (first-to-last cosine 0.86 on moving_shapes
  with the CLIP demo's tower), and a clip and its time reversal share all of it: the change is what order is made
  of, and normalising it fixes its scale whatever the tower's. The frame features themselves still pass the
  residual, and mean pooling is unchanged: it averages normalised frames either way;
- the position embeddings start at std 1, the scale of that normalised input (CLIP4Clip: 0.02, as BERT's). Self-
  attention is equivariant to the frames' order and the mean over frames invariant to it, so with positions at 2%
  of the input a clip and its reversal pool alike: in the demo (configs/video/tiny_moving_shapes.yaml, 400 steps)
  a clip scored above its own reversal in 48% of val_order pairs at std 0.02 (pooled pair cosine 1.0000) and in
  83% at std 1;
- clips have a fixed number of frames (the data samples `video.frames` uniformly), so there is no video mask;
- its blocks are pre-norm `models.layers.Block`s (CLIP's residual attention blocks are the same computation).
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from crossmodal.models.clip import CLIP
from crossmodal.models.layers import Transformer

POOLS = ("mean", "transformer")
HEAD_DIM = 64  # CLIP4Clip's temporal Transformer: 8 heads of 64 on ViT-B's 512-d embeddings


class TemporalTransformer(nn.Module):
    """Frame features (B, T, D) -> the same plus a temporal Transformer's view of the whole sequence (seqTransf)."""

    def __init__(self, dim: int, depth: int = 2, max_frames: int = 8, num_heads: int | None = None):
        super().__init__()
        self.max_frames = max_frames
        # frame position embeddings, at the scale of the normalised input: at CLIP4Clip's 0.02 they are 2% of it, and
        # attention, equivariant to the frames' order, and the mean over frames leave a clip and its reversal alike
        self.pos_embed = nn.Parameter(torch.randn(max_frames, dim))
        self.input_norm = nn.LayerNorm(dim)
        self.transformer = Transformer(dim, depth, num_heads or max(1, dim // HEAD_DIM))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)  # zero at initialisation: the pooling starts as meanP
        nn.init.zeros_(self.proj.bias)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        num_frames = frames.shape[1]
        if num_frames > self.max_frames:
            raise ValueError(f"a clip of {num_frames} frames; this temporal Transformer has position embeddings for "
                             f"{self.max_frames} (video.frames it was built with)")
        change = self.input_norm(frames - frames.mean(1, keepdim=True))  # what differs from the clip's mean frame
        x = self.transformer(change + self.pos_embed[:num_frames])  # (B, T, D)
        return frames + self.proj(self.norm(x))


class VideoCLIP(nn.Module):
    """A CLIP over clips (B, T, 3, H, W): frames through the image tower, pooled over time (module docstring)."""

    def __init__(self, clip: CLIP, pool: str = "mean", max_frames: int = 8, temporal_layers: int = 2):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}; got '{pool}'")
        self.pool = pool
        self.clip = clip
        self.temporal = (TemporalTransformer(clip.embed_dim, temporal_layers, max_frames) if pool == "transformer"
                         else nn.Identity())

    @property
    def embed_dim(self) -> int:
        return self.clip.embed_dim

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        return self.clip.logit_bias

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    def encode_frames(self, clips: torch.Tensor) -> torch.Tensor:
        """Per-frame features (B, T, D): the image tower's, normalised, after the temporal module."""
        num_frames = clips.shape[1]
        frames = self.clip.encode_image(rearrange(clips, "b t c h w -> (b t) c h w"), normalize=True)  # (B * T, D)
        return self.temporal(rearrange(frames, "(b t) d -> b t d", t=num_frames))  # (B, T, D)

    def encode_video(self, clips: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, D): the mean of the normalised frame features (CLIP4Clip normalises each frame, then the mean)."""
        features = F.normalize(self.encode_frames(clips), dim=-1).mean(1)  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Single images (B, 3, H, W) through the image tower alone (image tasks: zero-shot, retrieval)."""
        return self.clip.encode_image(images, normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize)

    def forward(self, clips: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {
            "image_features": self.encode_video(clips, normalize=True),  # (B, embed_dim): one per clip
            "text_features": self.encode_text(tokens, normalize=True),  # (B, embed_dim)
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }
