"""SVD-Cache with the paper's accelerated settings on the embedded FLUX model, each row's fidelity
against its own uncached run: few-step sampling (4 and 8 steps, warm-up 1, N = 2-3), an int8
weight quantized transformer, and another attention backend.

int8: torchao's int8 weight-only quantization of every nn.Linear (torchao.quantization.quantize_ with
Int8WeightOnlyConfig, an optional extra: pip install svdcache[torchao]; the row is skipped without it),
and torch's own dynamic int8 quantization (torch.ao.quantization.quantize_dynamic, int8 weights and
activations, CPU). Each against its own uncached quantized run. Counted FLOPs do not see quantized
linears, so those rows report no FLOPs ratio. FLUX's module adapter runs both: where the AdaLN gate
Linears' weights are not plain tensors (a method on a dynamic-quantized Linear, a torchao tensor
subclass without view ops) a cached step computes the whole modulation through the quantized Linear
instead of a GEMM on its gate rows; the submodule-level rows (zero-setup basis, next to the fp32 one)
compare the generic level on the same models.

    python bench/accelerated.py       # writes bench/results/accelerated.md
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import svdcache  # noqa: E402
from common import generate, prompt_set  # noqa: E402
from svdcache.embedded import load_basis, load_pipeline  # noqa: E402
from svdcache.metrics import psnr  # noqa: E402


def run_row(pipe, basis, prompts, seeds, steps, N, warmup, label, rows, **kw):
    ref, t_ref = generate(pipe, prompts, seeds, steps=steps)
    svdcache.enable(pipe, basis=basis, interval=N, warmup=warmup, **kw)
    img, t = generate(pipe, prompts, seeds, steps=steps)
    st = svdcache.stats(pipe).last_generation
    svdcache.disable(pipe)
    p = psnr(img, ref)
    rows.append(dict(label=label, steps=steps, N=N, warmup=warmup, psnr=float(p.mean()), psnr_min=float(p.min()),
                     full=st.full_steps, cached=st.cached_steps, flops=st.flops_ratio, t_ref=t_ref, t=t))
    print(rows[-1], flush=True)


def _torchao_int8(model):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def _torch_ao_dynamic(model):
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "accelerated.md"))
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    basis = load_basis()
    prompts, seeds = prompt_set(args.seeds)
    rows = []
    t0 = time.time()
    run_row(pipe, basis, prompts, seeds, 50, 5, 3, "baseline (50 steps)", rows)
    for steps, N in ((8, 2), (8, 3), (4, 2), (4, 3)):
        run_row(pipe, basis, prompts, seeds, steps, N, 1, f"few-step: {steps} steps", rows)
    fp = pipe.transformer
    backend_ok = True
    try:
        fp.set_attention_backend("_native_math")
    except Exception as e:  # an attention backend this diffusers / torch does not offer
        backend_ok = False
        print("attention backend row skipped:", e)
    if backend_ok:
        run_row(pipe, basis, prompts, seeds, 50, 5, 3, "attention backend _native_math (SDPA math kernel)", rows)
        fp.reset_attention_backend() if hasattr(fp, "reset_attention_backend") else fp.set_attention_backend("native")
    # the int8 row's fp32 counterpart (same granularity and zero-setup basis), to read it against
    run_row(pipe, None, prompts, seeds, 50, 5, 3, "fp32, submodule level, zero-setup basis", rows,
            granularity="submodule")
    for label, quantize in (("int8 weight-only (torchao)", _torchao_int8),
                            ("int8 dynamic-quantized linears (torch.ao, CPU)", _torch_ao_dynamic)):
        try:
            q = quantize(copy.deepcopy(fp))
        except Exception as e:  # torchao not installed, or not for this torch
            rows.append(dict(label=label, error=f"skipped: {type(e).__name__}: {str(e).splitlines()[0]}"))
            print(rows[-1])
            continue
        pipe.transformer = q
        try:
            for g, b, what in (("auto", basis, "FLUX module level, shipped basis"),
                               ("submodule", None, "submodule level, zero-setup basis")):
                try:
                    run_row(pipe, b, prompts, seeds, 50, 5, 3, f"{label}, {what}", rows, granularity=g)
                except Exception as e:  # one line, no traceback
                    svdcache.disable(pipe)
                    rows.append(dict(label=f"{label}, {what}", error=f"fails: {type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}"))
                    print(rows[-1])
        finally:
            pipe.transformer = fp
            del q
    secs = time.time() - t0
    lines = [
        "# Accelerated settings on the embedded model",
        "",
        f"`python bench/accelerated.py` ({secs:.0f} s, {platform.machine()} CPU, {os.cpu_count()} cores, shared): "
        f"{len(prompts)} images x the listed steps, embedded guidance, the shipped basis, default SVD-Cache settings "
        "otherwise. PSNR (dB) of the final images against the same setting uncached, mean (min). "
        "FLOPs: counted transformer FLOPs ratio uncached / cached (quantized linears are not counted).",
        "",
        "| setting | steps | N | warm-up | full / cached steps per context | PSNR | FLOPs ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | - | - | - | - | {r['error'][:110]} | - |")
            continue
        fl = f"{r['flops']:.2f}x" if r["flops"] and r["flops"] > 0 and "int8" not in r["label"] else "-"
        per_ctx = f"{r['full'] // 2} / {r['cached'] // 2}"
        lines.append(f"| {r['label']} | {r['steps']} | {r['N']} | {r['warmup']} | {per_ctx} | "
                     f"{r['psnr']:.1f} ({r['psnr_min']:.1f}) | {fl} |")
    lines += ["", __doc__.split("\n\n")[1].replace("\n", " ")]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
