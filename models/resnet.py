"""CLIP's modified ResNet image tower (Radford et al., 2021, section 2.4), a ResNet (He et al., 2016) with
the ResNet-D stem and shortcut (He et al., 2019, "Bag of Tricks") and anti-aliased pooling.

Changes from torchvision's ResNet that CLIP made, all reproduced so OpenAI's weights load by key:
- a 3-convolution stem (3x3 stride 2, 3x3, 3x3, each with BN + ReLU) followed by 2x2 average pooling
  instead of max pooling;
- anti-aliased strided blocks (Zhang, 2019): every convolution has stride 1; a strided block average-pools
  after `conv2`, and its shortcut average-pools before the 1x1 `downsample` convolution;
- global average pooling is replaced by `AttentionPool2d`: one multi-head attention layer in which only the
  mean token (plus positional embedding) queries all spatial tokens.

Deliberate differences from openai/CLIP `clip/model.py`: attention pooling uses
`F.scaled_dot_product_attention` instead of `F.multi_head_attention_forward` (same weights: `q_proj`, `k_proj`,
`v_proj`, `c_proj`), the pooled module reads batch-first tokens (B, HW, C), and the first argument is spelled
`spatial_dim`. Gradient checkpointing is not supported (as in open_clip): recomputing BatchNorm in training
mode would update its running statistics twice.
"""
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        if stride > 1 or inplanes != planes * self.expansion:
            # Keys "-1" (no parameters), "0", "1" as in OpenAI's checkpoints.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.avgpool(out)  # (B, planes, H/stride, W/stride)
        out = self.bn3(self.conv3(out))  # (B, 4 planes, H/stride, W/stride)
        return self.act3(out + self.downsample(x))


class AttentionPool2d(nn.Module):
    """Pool (B, HW, C) tokens to (B, output_dim): the mean token attends over [mean; tokens]. With
    `all_tokens`, every position queries too: (B, 1 + HW, output_dim), the pooled token first (BLIP's image
    tokens from a ResNet)."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_heads: int, output_dim: Optional[int] = None):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)

    def forward(self, x: torch.Tensor, all_tokens: bool = False) -> torch.Tensor:
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1 + HW, C)
        x = x + self.positional_embedding
        queries = x if all_tokens else x[:, :1]
        q = rearrange(self.q_proj(queries), "b t (h d) -> b h t d", h=self.num_heads)  # (B, heads, T, head_dim)
        k = rearrange(self.k_proj(x), "b s (h d) -> b h s d", h=self.num_heads)  # (B, heads, 1 + HW, head_dim)
        v = rearrange(self.v_proj(x), "b s (h d) -> b h s d", h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, head_dim), T = 1 or 1 + HW
        if all_tokens:
            return self.c_proj(rearrange(x, "b h t d -> b t (h d)"))  # (B, 1 + HW, output_dim)
        return self.c_proj(rearrange(x, "b h 1 d -> b (h d)"))  # (B, output_dim)


class ModifiedResNet(nn.Module):
    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        output_dim: int = 1024,
        heads: int = 32,
        image_size: int = 224,
        width: int = 64,
    ):
        super().__init__()
        if image_size % 32 != 0:
            raise ValueError(f"image_size {image_size} must be a multiple of 32 (the ResNet stride)")
        self.image_size = image_size
        self.output_dim = output_dim

        # 3-conv stem, stride 4 overall.
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)

        embed_dim = width * 32  # layer4 channels
        self.attnpool = AttentionPool2d(image_size // 32, embed_dim, heads, output_dim)
        self.initialize_parameters()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @torch.no_grad()
    def initialize_parameters(self) -> None:
        # openai/CLIP: attention-pool projections ~ N(0, C^-1); each residual branch starts at zero
        # (last BatchNorm gamma of every bottleneck = 0), so every block starts as the identity.
        std = self.attnpool.c_proj.in_features**-0.5
        for linear in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(linear.weight, std=std)
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError(
                "ModifiedResNet does not support gradient checkpointing: recomputing BatchNorm in training "
                "mode would update its running statistics twice"
            )

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> spatial tokens of the last stage (B, H/32 * W/32, 32 * width)."""
        return self.forward_stages(images)[1]

    def forward_stages(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> spatial tokens of the third and the last stage: (B, H/16 * W/16, 16 * width) and
        (B, H/32 * W/32, 32 * width)."""
        x = self.act1(self.bn1(self.conv1(images)))  # (B, width/2, H/2, W/2)
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.bn3(self.conv3(x)))  # (B, width, H/2, W/2)
        x = self.avgpool(x)  # (B, width, H/4, W/4)
        x = self.layer1(x)  # (B, 4 width, H/4, W/4)
        x = self.layer2(x)  # (B, 8 width, H/8, W/8)
        stage3 = self.layer3(x)  # (B, 16 width, H/16, W/16)
        x = self.layer4(stage3)  # (B, 32 width, H/32, W/32)
        return rearrange(stage3, "b c h w -> b (h w) c"), rearrange(x, "b c h w -> b (h w) c")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> image embedding (B, output_dim)."""
        return self.attnpool(self.forward_features(images))

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> attention-pooled tokens (B, 1 + H/32 * W/32, output_dim), the image embedding first."""
        return self.attnpool(self.forward_features(images), all_tokens=True)
