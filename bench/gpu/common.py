"""Shared by the GPU check's stages: the stage context (device, shapes, deadline), the JSONL sink,
timing (CUDA events on a GPU, perf_counter on the CPU), bandwidth yardsticks (copy bandwidth, the
card's spec peak) and the parity bookkeeping the op modules use.

Imported in the stage processes only (it imports torch); bench/gpu/check.py, the parent, does not.
Uses the public API of svdcache_kernels only.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BITS = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}  # significant bits
ULP = {dt: 2.0 ** (1 - b) for dt, b in BITS.items()}  # ulp(x) <= ULP * |x|

_FORCED_DOT16 = False


@contextlib.contextmanager
def forced_dot16():
    """Tiny mode: run the kernels' 16-bit tensor-core dot code path under the interpreter (with fp16: the
    interpreter's fp16 dot is right, its bf16 one is not), so that the emulated references the GPU's
    parity relies on are checked on the CPU too. The one use of a non-public name in bench/gpu:
    svdcache_kernels' FORCE_DOT_FP32 switch (a test hook of the kernels package)."""
    global _FORCED_DOT16
    from svdcache_kernels.ops import _triton_common as tc

    old = tc.FORCE_DOT_FP32
    tc.FORCE_DOT_FP32, _FORCED_DOT16 = False, True
    try:
        yield
    finally:
        tc.FORCE_DOT_FP32, _FORCED_DOT16 = old, False


# Spec HBM bandwidth (bytes/s) by device-name substring, first match wins (checked in this order).
PEAK_BW = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 80GB HBM3
    ("H800", 3.35e12),
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("L40", 0.864e12),
    ("L4", 0.300e12),
    ("A10G", 0.600e12),
    ("A10", 0.600e12),
    ("RTX 4090", 1.008e12),
    ("RTX 3090", 0.936e12),
)


def dn(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def clean(v):
    """JSON-safe: non-finite floats as strings, tensors and other objects as str."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    return str(v)


class Sink:
    """Appends one JSON object per line to the run's JSONL file, at once (O_APPEND, one write per
    line): a stage killed at its limit leaves every line it wrote."""

    def __init__(self, path: str, stage: str):
        self.stage = stage
        self.t0 = time.monotonic()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, type_: str, **fields) -> None:
        rec = {"stage": self.stage, "type": type_, "t": round(time.monotonic() - self.t0, 3)}
        rec.update({k: clean(v) for k, v in fields.items()})
        os.write(self.fd, (json.dumps(rec) + "\n").encode())

    def row(self, **fields) -> None:
        self.emit("row", **fields)

    def log(self, msg: str) -> None:
        print(f"[{self.stage} {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


class NullSink(Sink):
    """A sink that writes nothing (the precompile pool's workers: their stage writes their rows)."""

    def __init__(self, stage: str = "-"):
        self.stage = stage
        self.t0 = time.monotonic()

    def emit(self, type_: str, **fields) -> None:
        pass


@dataclass
class Shapes:
    """FLUX.1-dev's cached streams at 1024x1024: 4096 image tokens, 512 text tokens, D = 3072."""

    B: int
    N: int  # image rows (the double blocks' image stream)
    L: int  # text rows (the single blocks hold them first)
    D: int

    @property
    def J(self) -> int:  # joint rows (single blocks)
        return self.L + self.N


FLUX_SHAPES = Shapes(B=1, N=4096, L=512, D=3072)
TINY_SHAPES = Shapes(B=1, N=48, L=16, D=64)


@dataclass
class Ctx:
    """What a stage knows: where it runs, at which shapes, until when, and where it writes."""

    stage: str
    tiny: bool
    deadline: float  # time.time() by which the stage must have written its summary
    sink: Sink
    params: dict = field(default_factory=dict)
    device: torch.device = None
    dtype: torch.dtype = torch.bfloat16
    shapes: Shapes = None
    ks: tuple = ()
    gen: torch.Generator = None
    skipped: list = field(default_factory=list)  # items not run for lack of time

    def __post_init__(self):
        if self.device is None:
            self.device = torch.device("cpu" if self.tiny else "cuda")
        if self.shapes is None:
            self.shapes = TINY_SHAPES if self.tiny else FLUX_SHAPES
        if not self.ks:
            ks = self.params.get("ks")
            self.ks = tuple(int(k) for k in ks.split(",")) if ks else ((2, 16) if self.tiny else (2, 32))
        self.gen = torch.Generator(device=self.device).manual_seed(int(self.params.get("seed", 0)))

    # ---- budget
    def left(self) -> float:
        return self.deadline - time.time()

    def enough(self, need_s: float, what: str) -> bool:
        """True if ``need_s`` seconds are left; else records ``what`` as skipped (budget)."""
        if self.left() >= need_s:
            return True
        self.skipped.append(what)
        return False

    # ---- device helpers
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def dot16(self, dtype: torch.dtype | None = None) -> bool:
        """Whether the kernels take the 16-bit tensor-core dot for this activation dtype: on a GPU
        without the interpreter, for bf16/fp16 (svdcache_kernels' dot_fp32 rule, restated here: the
        bench uses the package's public API only)."""
        dtype = dtype or self.dtype
        if _FORCED_DOT16:
            return dtype != torch.float32
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        return self.device.type == "cuda" and not interp and dtype != torch.float32

    def rnd(self, *shape, dtype=torch.float32, scale=1.0, shift=0.25) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.gen, device=self.device) * scale + shift).to(dtype)

    def nan(self, *shape, dtype=torch.float32) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=dtype, device=self.device)

    def basis(self, D: int, k: int) -> torch.Tensor:
        """An orthonormal (D, k) fp32 basis (QR of a Gaussian; k <= 64: no fp64, cheap at D = 3072)."""
        q, _ = torch.linalg.qr(torch.randn(D, k, generator=self.gen, device=self.device))
        return q.contiguous()

    def gate(self, B: int, D: int, dtype=None) -> torch.Tensor:
        """FLUX's gate: a D-wide chunk of the (B, 6D) modulation, as (B, 1, D) (a strided view)."""
        mod = self.rnd(B, 6 * D, dtype=dtype or self.dtype)
        return mod[:, 2 * D:3 * D].unsqueeze(1)


# ---------------------------------------------------------------------------------------------------
# Int4 / int8 row codes (the layout of svdcache_kernels' quantized dR), for building inputs and
# comparing codes. Codes are made with the package's residual_codes_reference; unpacking is
# restated here (two lines) so the bench needs nothing beyond the top-level exports.
# ---------------------------------------------------------------------------------------------------
def code_values(codes: torch.Tensor, D: int, bits: int) -> torch.Tensor:
    """Integer values of int8 codes, or of 4-bit codes packed two per byte (element 2j in the low
    nibble, 2j+1 in the high one, each stored as value + 8)."""
    if bits == 8:
        return codes.to(torch.int16)
    lo = (codes & 15).to(torch.int16) - 8
    hi = (codes >> 4).to(torch.int16) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :D]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, D: int, bits: int) -> torch.Tensor:
    return code_values(codes, D, bits).float() * scales


def make_codes(ctx: Ctx, rows: int, D: int, bits: int, B: int = 1):
    """(codes, scales) of a realistic residual difference, written by the reference op."""
    from svdcache_kernels import residual_codes_reference

    k = 2
    F = ctx.rnd(B, rows, D, scale=1.0)
    Fp = F + ctx.rnd(B, rows, D, scale=0.3, shift=0.0)
    V = ctx.basis(D, k)
    D1 = ctx.rnd(B, rows, k, scale=0.1)
    codes = torch.empty(B, rows, D if bits == 8 else D // 2, dtype=torch.int8 if bits == 8 else torch.uint8,
                        device=ctx.device)
    scales = torch.empty(B, rows, 1, device=ctx.device)
    residual_codes_reference(F, Fp, D1, V, h=1.0, bits=bits, codes=codes, scales=scales)
    return codes, scales


# ---------------------------------------------------------------------------------------------------
# Cases: one op variant at one shape, for precompile, parity and timing alike
# ---------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One variant of an op. ``build()`` allocates its inputs (a dict). ``kernel(s)`` runs the public op
    on the Triton backend and returns {output name: tensor}; ``reference(s)`` runs the *_reference op the
    same way; ``checks(s, got, ref)`` returns parity rows (see :func:`check`). ``plan(s)`` returns a
    zero-argument callable that runs the variant through the plan the runtime uses (or the op, where
    the runtime calls the op), for timing; ``eager(s)`` the same for the reference. ``bytes``: the
    minimal traffic (each input read once, each output written once); ``ideal``: the traffic of the
    least any implementation must move, where it is less than ``bytes`` (None: the same)."""

    op: str
    name: str
    k: Any
    build: Callable[[], dict]
    kernel: Callable[[dict], dict] | None
    reference: Callable[[dict], dict] | None
    checks: Callable[[dict, dict, dict], list] | None
    plan: Callable[[dict], Callable[[], Any]] | None
    eager: Callable[[dict], Callable[[], Any]] | None = None
    bytes: int = 0
    flops: int = 0
    ideal: int | None = None
    parity: bool = True
    timing: bool = True
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.op} | {self.name} | k={self.k}"


def maxabs(t: torch.Tensor) -> float:
    return float(t.float().abs().max()) if t.numel() else 0.0


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def check(out: str, got: torch.Tensor, want: torch.Tensor, tol_rel: float, scale: float, against: str) -> dict:
    """One parity row: max |got - want| against ``tol_rel * scale`` (and finiteness)."""
    e = err(got, want)
    allowed = tol_rel * max(scale, 1e-30)
    finite = bool(torch.isfinite(got.float()).all())
    return dict(out=out, against=against, err=e, tol=allowed, ratio=e / allowed if allowed else float("inf"),
                ok=finite and e <= allowed, finite=finite)


def tol32(n_sum: int) -> float:
    """fp32 outputs of sums of ``n_sum`` products in another order, relative to the output's scale."""
    return max(2e-5, 4e-8 * n_sum)


def clone_state(s: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}


def run_parity(ctx: Ctx, cases: list, need_s: float) -> tuple[int, int]:
    """Run each case's kernel and reference on the same inputs; emit one row per output checked.
    Budget-checked before each case (``need_s``: what one case may take). Returns (passed, checked)."""
    n_ok = n = 0
    for c in cases:
        if not c.parity:
            continue
        if not ctx.enough(need_s, c.label):
            continue
        t = time.monotonic()
        try:
            s = c.build()
            got = c.kernel(clone_state(s))
            ctx.sync()
            ref = c.reference(clone_state(s))
            ctx.sync()
            rows = c.checks(s, got, ref)
            del s, got, ref
        except Exception as e:  # one broken op must not hide the others' numbers
            rows = [dict(out="-", against="-", err=None, tol=None, ratio=None, ok=False, finite=False,
                         error=f"{type(e).__name__}: {e}")]
        for r in rows:
            n += 1
            n_ok += bool(r["ok"])
            ctx.sink.row(op=c.op, case=c.name, k=c.k, dtype=dn(ctx.dtype), s=round(time.monotonic() - t, 3), **r)
            if not r["ok"]:
                ctx.sink.log(f"PARITY FAIL {c.label} {r['out']} vs {r['against']}: err {r['err']} tol {r['tol']} "
                             f"{r.get('error', '')}")
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return n_ok, n


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------
class Timer:
    """Median time of a callable: CUDA events around each call on a GPU (the L2 cache flushed between
    calls, outside the events), perf_counter on the CPU."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self._flush = None

    def ms(self, fn, reps: int | None = None, max_s: float = 1.0) -> dict:
        ctx = self.ctx
        if ctx.device.type != "cuda":
            fn()
            reps = reps or 5
            ts = []
            t_end = time.monotonic() + max_s
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
                if time.monotonic() > t_end and len(ts) >= 3:
                    break
            return dict(ms=statistics.median(ts), min_ms=min(ts), reps=len(ts))
        if self._flush is None:
            self._flush = torch.empty(256 << 20, dtype=torch.int8, device=ctx.device)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        reps = reps or 25
        ts = []
        t_end = time.monotonic() + max_s
        for _ in range(reps):
            self._flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
            if time.monotonic() > t_end and len(ts) >= 5:
                break
        return dict(ms=statistics.median(ts), min_ms=min(ts), reps=len(ts))


def copy_bandwidth(ctx: Ctx, timer: Timer) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second): the yardstick a
    bandwidth-bound kernel is measured against."""
    n = (8 << 20) if ctx.device.type != "cuda" else (1 << 30)
    src = torch.ones(n, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    t = timer.ms(lambda: dst.copy_(src), reps=10 if ctx.device.type == "cuda" else 5)
    del src, dst
    return 2 * n / (t["ms"] * 1e-3)


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW:
        if key.lower() in name.lower():
            return bw
    return None


def device_name(ctx: Ctx) -> str:
    if ctx.device.type == "cuda":
        return torch.cuda.get_device_name(ctx.device)
    return "CPU"


def run_timing(ctx: Ctx, cases: list, timer: Timer, need_s: float, peak_bw: float | None, copy_bw: float | None) -> int:
    """Time each case through its plan (and its eager reference); emit one row per case with GB/s
    from the minimal bytes, the fraction of the spec peak and of the copy bandwidth, TFLOP/s and the
    ratio to the ideal traffic at copy bandwidth. Budget-checked before each case. Returns (rows, errors)."""
    n = errors = 0
    for c in cases:
        if not c.timing or c.plan is None:
            continue
        if not ctx.enough(need_s, c.label):
            continue
        row = dict(op=c.op, case=c.name, k=c.k, bytes=c.bytes, flops=c.flops, note=c.note)
        try:
            s = c.build()
            call = c.plan(s)
            t = timer.ms(call)
            row.update(ms=t["ms"], min_ms=t["min_ms"], reps=t["reps"])
            if c.eager is not None and ctx.left() > need_s:
                ref = c.eager(clone_state(s))
                row["eager_ms"] = timer.ms(ref, reps=10 if ctx.device.type == "cuda" else 3, max_s=0.5)["ms"]
            del s, call
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            errors += 1
            ctx.sink.log(f"TIMING ERROR {c.label}: {row['error']}")
        ms = row.get("ms")
        if ms:
            gbs = c.bytes / (ms * 1e-3)
            row["gbs"] = gbs / 1e9
            row["tflops"] = c.flops / (ms * 1e-3) / 1e12 if c.flops else None
            row["pct_peak"] = 100 * gbs / peak_bw if peak_bw else None
            row["pct_copy"] = 100 * gbs / copy_bw if copy_bw else None
            ideal = c.ideal if c.ideal is not None else c.bytes
            row["ideal_ms"] = ideal / copy_bw * 1e3 if copy_bw else None
            row["x_ideal"] = ms / row["ideal_ms"] if row.get("ideal_ms") else None
            if row.get("eager_ms"):
                row["x_eager"] = row["eager_ms"] / ms
        ctx.sink.row(**row)
        n += 1
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return n, errors


# ---------------------------------------------------------------------------------------------------
# Triton's on-disk cache: how many kernels were compiled
# ---------------------------------------------------------------------------------------------------
def compiled_kernels(cache_dir: str | None) -> int | None:
    """Number of compiled kernel binaries in a Triton cache directory (cubin / hsaco files). None if
    no directory is known. Under the interpreter nothing is compiled (0)."""
    if not cache_dir or not os.path.isdir(cache_dir):
        return None
    n = 0
    for _, _, files in os.walk(cache_dir):
        n += sum(f.endswith((".cubin", ".hsaco")) for f in files)
    return n
