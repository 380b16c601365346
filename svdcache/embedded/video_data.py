"""The embedded video model's data: sklearn's digits moving across a few frames, and their prompts.

A clip is FRAMES frames of FRAME x FRAME pixels (one channel, in [-1, 1]); an 8 x 8 digit starts at a
random position and moves one direction (left / right / up / down) at 1 or 2 pixels per frame,
staying in the frame. Everything is deterministic in the seed.

Prompts are "<word> moving <direction>" (e.g. "seven moving left"); they are encoded by a fixed,
seeded embedding table (no text encoder, no download): one TEXT_DIM vector per word, padded to
TEXT_LEN tokens. The empty prompt (all padding) is the dropped condition of classifier-free guidance.
"""
from __future__ import annotations

import torch

FRAMES = 4
FRAME = 16  # pixels; patch (1, 2, 2) gives 4 x 8 x 8 = 256 tokens
DIGIT = 8
TEXT_LEN = 4
TEXT_DIM = 32
TEXT_SEED = 1234

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIRECTIONS = ["left", "right", "up", "down"]
_VELOCITY = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) per frame
VOCAB = ["<pad>", "moving"] + NUMBER_WORDS + DIRECTIONS


def prompt_for(digit: int, direction: int | str) -> str:
    d = direction if isinstance(direction, str) else DIRECTIONS[direction]
    return f"{NUMBER_WORDS[digit]} moving {d}"


def all_prompts() -> list[str]:
    return [prompt_for(d, k) for d in range(10) for k in range(len(DIRECTIONS))]


def _table() -> torch.Tensor:
    g = torch.Generator().manual_seed(TEXT_SEED)
    return torch.randn(len(VOCAB), TEXT_DIM, generator=g)


_TABLE = None


def encode_prompts(prompts) -> torch.Tensor:
    """(B, TEXT_LEN, TEXT_DIM) embeddings of the prompts ("" is the empty prompt: all padding)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _table()
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = []
    for p in prompts:
        words = p.split()
        if len(words) > TEXT_LEN or any(w not in VOCAB for w in words):
            raise ValueError(f"prompt {p!r}: the embedded video model knows only {VOCAB[1:]} (<= {TEXT_LEN} words)")
        ids.append([VOCAB.index(w) for w in words] + [0] * (TEXT_LEN - len(words)))
    return _TABLE[torch.tensor(ids)]


def digit_images():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    return x, torch.tensor(d.target, dtype=torch.long)


def make_clips(n: int, seed: int = 0, images=None):
    """``n`` clips (n, 1, FRAMES, FRAME, FRAME) in [-1, 1], their digit labels (n,) and directions (n,)."""
    x, y = digit_images() if images is None else images
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.shape[0], (n,), generator=g)
    dirs = torch.randint(0, len(DIRECTIONS), (n,), generator=g)
    speed = torch.randint(1, 3, (n,), generator=g)
    u = torch.rand(n, 2, generator=g)
    clips = torch.zeros(n, 1, FRAMES, FRAME, FRAME)
    room = FRAME - DIGIT  # start positions 0..room
    for i in range(n):
        dy, dx = _VELOCITY[DIRECTIONS[int(dirs[i])]]
        s = int(speed[i])
        span = s * (FRAMES - 1)
        # along the motion: start so that the whole path stays in the frame; across it: anywhere
        lo_y, hi_y = (span, room) if dy < 0 else (0, room - span) if dy > 0 else (0, room)
        lo_x, hi_x = (span, room) if dx < 0 else (0, room - span) if dx > 0 else (0, room)
        y0 = lo_y + int(u[i, 0] * (hi_y - lo_y + 1 - 1e-6))
        x0 = lo_x + int(u[i, 1] * (hi_x - lo_x + 1 - 1e-6))
        for f in range(FRAMES):
            py, px = y0 + dy * s * f, x0 + dx * s * f
            clips[i, 0, f, py : py + DIGIT, px : px + DIGIT] = x[idx[i]]
    return clips * 2 - 1, y[idx], dirs
