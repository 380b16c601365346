"""Design sweeps on the development set (never the evaluated images): PSNR vs uncached and counted
FLOPs ratio of SVD-Cache configurations, as bench/fidelity.py measures them.

    python bench/dev_sweep.py --out dev.jsonl --row 'default N=7' '{"interval": 7}' \
        --row 'tau.3 N=7' '{"interval": 7, "tau": 0.3}'

Dev set: bench.common.dev_prompt_set (other phrasings than the evaluated and the calibration sets,
seeds 50000 + ...). Rows already in ``--out`` are skipped (a sweep resumes where it stopped)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import fidelity  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="jsonl file the rows are appended to")
    ap.add_argument("--row", nargs=2, action="append", metavar=("NAME", "CFG_JSON"), default=[],
                    help="a row: its name and an SVDCacheConfig as JSON (repeatable)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per digit prompt (10 prompts)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    rows = []
    for name, cfg in args.row:
        try:
            rows.append((name, json.loads(cfg)))
        except json.JSONDecodeError as e:
            ap.error(f"--row {name!r}: not JSON ({e})")
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {json.loads(line)["name"] for line in f if line.strip()}
    todo = [(n, c) for n, c in rows if n not in done]
    if not todo:
        print("nothing to do")
        return
    b = fidelity.Bench(argparse.Namespace(threads=args.threads, seeds=4, steps=args.steps, quick=True))
    b.prompts, b.seeds = common.dev_prompt_set(args.seeds)
    b.unit_bytes = b.unit_bytes * len(b.prompts) // 40
    b.reference()
    for i, (name, cfg) in enumerate(todo):
        t0 = time.perf_counter()
        r = b.run(dict(name=name, family=name, kind="svdcache", cfg=cfg))
        r = {k: v for k, v in r.items() if isinstance(v, (int, float, str, dict, list, type(None)))}
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"[{i + 1}/{len(todo)}] {name}: {r['psnr']:.2f} dB at {r['flops_ratio']:.3f}x "
              f"({r.get('mem_copies') or 0:.2f} copies, {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
