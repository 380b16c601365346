"""Where the submodule level loses on FLUX: module level for one block class and the generic
submodule level for the other (auto granularity with one of FLUX's module adapters removed), and
the single blocks at submodule level with only their attention cached (``proj_mlp`` computed).
Same images, steps, guidance and basis recipe as bench/granularity.py.

    python bench/granularity_hybrid.py      # prints one line per (variant, N); see results/granularity.md
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import svdcache  # noqa: E402
import svdcache.adapters as A  # noqa: E402
import svdcache.adapters.heavy as S  # noqa: E402
from calibrate_embedded import calibrate_reference  # noqa: E402
from common import generate, prompt_set  # noqa: E402
from svdcache.embedded import load_pipeline  # noqa: E402
from svdcache.metrics import psnr  # noqa: E402

VARIANTS = {
    "double: module, single: submodule": ("FluxSingleTransformerBlock", True),
    "double: submodule, single: module": ("FluxTransformerBlock", True),
    "double: module, single: submodule (attn only)": ("FluxSingleTransformerBlock", False),
}


def main():
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = prompt_set(1)
    ref, _ = generate(pipe, prompts, seeds)
    full, mlp = dict(A.MODULE_ADAPTERS), S._MLP_LINEAR
    for label, (drop, proj_mlp) in VARIANTS.items():
        A.MODULE_ADAPTERS.clear()
        A.MODULE_ADAPTERS.update({k: v for k, v in full.items() if k != drop})
        S._MLP_LINEAR = mlp if proj_mlp else re.compile(r"^$")
        basis = calibrate_reference(pipe, progress=False)
        for N in (3, 5, 8):
            svdcache.enable(pipe, basis=basis, interval=N)
            img, _ = generate(pipe, prompts, seeds)
            st = svdcache.stats(pipe).last_generation
            print(f"{label}: N={N} psnr {float(psnr(img, ref).mean()):.2f} flops {st.flops_ratio:.2f}x", flush=True)
            svdcache.disable(pipe)
    A.MODULE_ADAPTERS.clear()
    A.MODULE_ADAPTERS.update(full)
    S._MLP_LINEAR = mlp


if __name__ == "__main__":
    main()
