"""Image transforms: CLIP's preprocessing (Radford et al., 2021), with a mild random crop for training.

Evaluation follows OpenAI's `_transform` step for step: bicubic resize of the shortest side, centre
crop, RGB conversion, OpenAI mean and std (the order matters for palette and CMYK images, which are
resampled in their own mode before the conversion). Deliberate differences for training: images are
converted to RGB first, and RandomResizedCrop(scale 0.9-1) is used but never a horizontal flip, because
captions say "left" and "right". Randomness comes only from torch's global RNG, so seeding it before
the call reproduces the crop.
"""
import torchvision.transforms as T
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")  # a named function, not a lambda, so DataLoader workers can pickle it


def image_transform(
    image_size: int,
    train: bool,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> T.Compose:
    """PIL image -> normalised float tensor (3, image_size, image_size)."""
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        steps = [convert_to_rgb, T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic)]
    else:  # the reference's order, so released weights see the pixels they were evaluated on
        steps = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size), convert_to_rgb]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
