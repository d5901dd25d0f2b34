"""Image transforms: CLIP's preprocessing (Radford et al., 2021), with a mild random crop for training.

Deliberate differences from OpenAI's `_transform`: images are converted to RGB first (before any
resampling), and training adds RandomResizedCrop(scale 0.9-1) but never a horizontal flip, because
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
        resize = [T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic)]
    else:
        resize = [T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size)]
    return T.Compose([convert_to_rgb, *resize, T.ToTensor(), T.Normalize(mean, std)])
