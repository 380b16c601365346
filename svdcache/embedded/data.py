"""The embedded model's data: sklearn's digits upscaled, and the prompts that name them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32  # pixels; VAE /2 and 2x2 packing give (32/4)^2 = 64 image tokens
MAX_SEQUENCE_LENGTH = 16  # T5 tokens; the prompts are short

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# A few phrasings per class; {w} is the word, {n} the numeral.
TEMPLATES = [
    "a handwritten digit {w}",
    "the number {n}",
    "a drawing of the digit {w}",
    "handwritten {n}",
    "{w}",
]


def prompts_for(digit: int) -> list[str]:
    return [t.format(w=NUMBER_WORDS[digit], n=digit) for t in TEMPLATES]


def canonical_prompt(digit: int) -> str:
    """The prompt used by the demo, tests and benchmarks for ``digit``."""
    return TEMPLATES[0].format(w=NUMBER_WORDS[digit], n=digit)


def all_prompts() -> list[str]:
    return [p for d in range(10) for p in prompts_for(d)]


def load_digit_images(shifts_per_image: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits as (M, 3, 32, 32) images in [-1, 1] plus labels (M,).

    Each 8x8 digit is upscaled bilinearly to 24x24 and placed in the 32x32 frame at small random
    offsets (augmentation: the data set has only 1,797 images).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    up = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False).clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    imgs, labels = [], []
    for s in range(shifts_per_image):
        canvas = torch.zeros(up.shape[0], 1, IMAGE_SIZE, IMAGE_SIZE)
        if s == 0:
            off = torch.full((up.shape[0], 2), 4)
        else:
            off = torch.randint(2, 7, (up.shape[0], 2), generator=g)
        for i in range(up.shape[0]):
            oy, ox = int(off[i, 0]), int(off[i, 1])
            canvas[i, :, oy : oy + 24, ox : ox + 24] = up[i]
        imgs.append(canvas)
        labels.append(y)
    img = torch.cat(imgs) * 2 - 1
    return img.expand(-1, 3, -1, -1).contiguous(), torch.cat(labels)


def to_classifier_features(images: torch.Tensor) -> torch.Tensor:
    """Pipeline images (B, 3, 32, 32) in [0, 1] -> (B, 64) features on sklearn digits' 0..16 scale."""
    gray = images.float().mean(1, keepdim=True)
    # find the digit's bounding frame the way the data was made: 24x24 at the centre, pooled to 8x8
    crop = gray[:, :, 4:28, 4:28]
    small = F.adaptive_avg_pool2d(crop, 8)
    return (small.clamp(0, 1) * 16).flatten(1)
