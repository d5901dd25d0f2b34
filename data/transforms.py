"""Image transforms: CLIP's preprocessing (Radford et al., 2021), with a mild random crop for training.

Evaluation follows OpenAI's `_transform` step for step: bicubic resize of the shortest side, centre
crop, RGB conversion, OpenAI mean and std (the order matters for palette and CMYK images, which are
resampled in their own mode before the conversion). Deliberate differences for training: images are
converted to RGB first, and RandomResizedCrop(scale 0.9-1) is used but never a horizontal flip, because
captions say "left" and "right". Randomness comes only from torch's global RNG, so seeding it before
the call reproduces the crop.

A JPEG that training decoded at a reduced DCT scale (data.jpeg_draft, `open_image` records the full size in
`image.info["full_size"]`) gets the crop drawn on its full size, with torchvision's parameters and RNG calls,
and that box scaled onto the decoded pixels: the same region as a full decode, resampled from fewer pixels.
"""
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")  # a named function, not a lambda, so DataLoader workers can pickle it


class RandomResizedCrop(T.RandomResizedCrop):
    """torchvision's RandomResizedCrop (same parameters, same RNG calls, same pixels for a fully decoded
    image), whose box is drawn on `image.info["full_size"]` when a reduced-scale decode recorded it."""

    def forward(self, image: Image.Image) -> Image.Image:
        full_width, full_height = image.info.get("full_size", image.size)
        if (full_width, full_height) == image.size:
            return super().forward(image)
        full = torch.empty(1, 1, 1).expand(1, full_height, full_width)  # get_params reads only the shape
        top, left, height, width = self.get_params(full, self.scale, self.ratio)
        sx, sy = image.width / full_width, image.height / full_height
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)  # fractional: PIL resamples it exactly
        return image.resize(self.size[::-1], TF.pil_modes_mapping[self.interpolation], box=box)


def image_transform(
    image_size: int,
    train: bool,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> T.Compose:
    """PIL image -> normalised float tensor (3, image_size, image_size)."""
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        steps = [convert_to_rgb, RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic)]
    else:  # the reference's order, so released weights see the pixels they were evaluated on
        steps = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size), convert_to_rgb]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std, inplace=True)])  # ToTensor's tensor is new
