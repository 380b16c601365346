"""Coverage table: every transformer class of tests/models/zoo_all.py (diffusers' own tiny test
configs), checked as tests/models/test_coverage.py does (zoo_check.check: interval 1 bit-exact,
cached steps skip the attention / feed-forward modules of the cached block lists, uncached lists
named in one warning, disable bit-exact), at the default granularity and at block level.

    python bench/coverage.py            # writes bench/results/coverage.md
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "models"))
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

import zoo_all as Z  # noqa: E402
import zoo_check as C  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "coverage.md"))
    ap.add_argument("--names", nargs="*", default=None, help="classes (default: all of zoo_all)")
    ap.add_argument("--no-block", action="store_true", help="skip the block-level column")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import warnings

    warnings.simplefilter("ignore")
    names = args.names or list(Z.NAMES)
    rows = []
    t0 = time.time()
    for n in names:
        r = C.check(n)
        b = None if args.no_block else C.check(n, granularity="block")
        rows.append((n, r, b))
        print(f"{n:42s} {r.granularity:10s} {'ok' if r.ok else 'FAIL':4s} {r.detail}"
              + ("" if b is None else f" | block: {'ok' if b.ok else 'FAIL'} {b.detail}"), flush=True)
    secs = time.time() - t0
    import diffusers

    named = [(n, r, b) for n, r, b in rows if not Z.ZOO[n].extra]
    ok = sum(r.ok for _, r, _ in named)
    ok_block = sum(bool(b and b.ok) for _, _, b in named)
    lines = [
        "# Coverage: diffusers transformer classes",
        "",
        f"`python bench/coverage.py` ({secs:.0f} s on {platform.machine()} CPU, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, diffusers {diffusers.__version__}). Each class is built from the tiny config of "
        "diffusers' own model test (tests/models/zoo_all.py) and run for "
        f"{C.STEPS} decreasing timesteps; interval {C.INTERVAL}, warm-up {C.WARMUP}, zero-setup basis. "
        "A class passes when interval 1 is bit-exact, no attention / feed-forward module of a cached block "
        "list computes on a cached step (leaf calls counted), every block list not cached is named in one "
        "warning, and disable is bit-exact (tests/models/zoo_check.py; the same check runs in CI as "
        "tests/models/test_coverage.py).",
        "",
        f"**{ok} of {len(named)}** classes named \"...Transformer...\" pass at the default granularity"
        + ("" if args.no_block else f" ({ok_block} at block level)")
        + f"; {sum(r.ok for n, r, _ in rows if Z.ZOO[n].extra)} of {len(rows) - len(named)} other DiTs.",
        "",
        "Relative error: ||y - y_ref|| / ||y_ref|| of the last step's output of the cached run (random tiny "
        "models, so only a sanity figure: a broken forecast gives ~1).",
        "",
        "| class | granularity | result | heavy leaf calls skipped on cached steps | rel. error | block level | "
        "rel. error (block) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, r, b in rows:
        res = "ok" if r.ok else "**fails**"
        skipped = r.detail if r.ok else r.detail.replace("|", "/")
        blk = "-" if b is None else ("ok" if b.ok else "fails: " + b.detail.replace("|", "/")[:90])
        e, eb = f"{r.rel_err:.3f}" if r.ok else "-", f"{b.rel_err:.3f}" if b is not None and b.ok else "-"
        lines.append(f"| {n}{' (extra)' if Z.ZOO[n].extra else ''} | {r.granularity or '-'} | {res} | "
                     f"{skipped} | {e} | {blk} | {eb} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {ok}/{len(named)} ({secs:.0f} s)")


if __name__ == "__main__":
    main()
