"""Which steps are computed in full and which are forecast."""
from __future__ import annotations


def is_full_step(step: int, *, interval: int, warmup: int, tail: int = 0, num_steps: int | None = None) -> bool:
    """Full compute for the first ``warmup`` steps, then every ``interval``-th step counted from the
    last warmup step (so ``interval - 1`` cached steps follow each full one), and for the last
    ``tail`` steps when ``num_steps`` is known."""
    if interval <= 1 or step < warmup:
        return True
    if tail and num_steps is not None and step >= num_steps - tail:
        return True
    return (step - warmup + 1) % interval == 0


def full_steps(num_steps: int, *, interval: int, warmup: int, tail: int = 0) -> list[int]:
    return [i for i in range(num_steps) if is_full_step(i, interval=interval, warmup=warmup, tail=tail, num_steps=num_steps)]
