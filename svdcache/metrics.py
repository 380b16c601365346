"""Image fidelity metrics (images in [0, 1], shape (B, C, H, W))."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB; identical images give +inf."""
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), mean over
    channels and valid window positions."""
    a, b = a.double(), b.double()
    C = a.shape[1]
    w = _gaussian().to(a.device)[None, None].expand(C, 1, -1, -1)
    mu_a, mu_b = F.conv2d(a, w, groups=C), F.conv2d(b, w, groups=C)
    saa = F.conv2d(a * a, w, groups=C) - mu_a**2
    sbb = F.conv2d(b * b, w, groups=C) - mu_b**2
    sab = F.conv2d(a * b, w, groups=C) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    m = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return m.flatten(1).mean(1)
