"""One rank of the distributed tests: ``python cp_worker.py <scenario> <modes> <out_dir>``.

Runs a tiny FluxTransformer2DModel under diffusers' context parallelism (gloo, CPU; ``modes`` a
comma list of ``ulysses`` / ``ring``, and ``tensor`` for tensor parallelism) with and without SVD-Cache, the same runs in one process
without parallelism for reference, counts every torch.distributed collective per transformer call,
and writes what it measured to ``out_dir/rank<r>.pt`` (torch.save of a dict). Scenarios:

- ``parity``: per mode: uncached, calibration under context parallelism, offline basis (calibrated
  in one process), zero-setup basis, a NaN forecast on rank 1 only, stats(all_ranks=True); saved,
  then rank 1 raises inside a cached step and rank 0 must end on its own (exit code 3 on both).
- ``desync``: rank 1 alone recomputes one cached step in full (what a per-rank fallback decision
  would do); measures what diffusers' collectives then do (``python dist_launch.py desync``).
"""
from __future__ import annotations

import datetime
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

torch.set_num_threads(1)
# diffusers 0.42.1 builds its device mesh with rank % torch.accelerator.device_count(): 0 on a CPU-only machine
torch.accelerator.device_count = lambda: 1

import svdcache  # noqa: E402
from diffusers import ContextParallelConfig, FluxTransformer2DModel  # noqa: E402

CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
              num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 12, 12))
STEPS = 8
INTERVAL = 3
B, H, W, L = 2, 8, 8, 16  # batch, image grid (64 tokens), text tokens


def build(seed=0):
    torch.manual_seed(seed)
    m = FluxTransformer2DModel(**CONFIG).eval()
    m.set_attention_backend("native")
    return m


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(H, W, 3)
    img_ids[..., 1] = torch.arange(H)[:, None]
    img_ids[..., 2] = torch.arange(W)[None, :]
    return dict(
        x=torch.randn(B, H * W, 64, generator=g),
        encoder_hidden_states=torch.randn(B, L, 64, generator=g),
        pooled_projections=torch.randn(B, 32, generator=g),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(L, 3),
    )


# -- counting collectives ---------------------------------------------------------------------------
class CollectiveCounter:
    """Wraps every public collective of torch.distributed and of its functional collectives (what
    diffusers' context parallelism calls) and records, per transformer call, the collectives issued,
    in order, and whether svdcache's own code issued them. Calls nested in an outer collective
    (all_gather_object -> all_gather) count once."""

    DIST = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "broadcast",
            "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "send", "recv", "isend",
            "irecv", "barrier", "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
            "batch_isend_irecv", "monitored_barrier")
    FUNCOL = ("all_reduce", "all_gather_tensor", "all_gather_tensor_autograd", "all_to_all_single",
              "all_to_all_single_autograd", "permute_tensor", "reduce_scatter_tensor", "broadcast",
              "all_reduce_coalesced", "all_gather_into_tensor_coalesced", "reduce_scatter_tensor_coalesced")

    def __init__(self):
        import torch.distributed._functional_collectives as funcol

        self.calls: list[list[tuple[str, bool, str]]] = []  # (collective, issued by svdcache, caller file)
        self.cur: list | None = None
        self.outside: list[tuple[str, bool, str]] = []
        self.depth = 0
        for mod, names, prefix in ((dist, self.DIST, "dist."), (funcol, self.FUNCOL, "funcol.")):
            for n in names:
                f = getattr(mod, n, None)
                if f is not None:
                    setattr(mod, n, self._wrap(f, prefix + n))

    def _wrap(self, f, name):
        def wrapped(*a, **k):
            if self.depth == 0:
                # who called it: the innermost frame outside torch (svdcache's own code, or diffusers')
                caller = next((fr.filename for fr in reversed(traceback.extract_stack()[:-1])
                               if f"{os.sep}torch{os.sep}" not in fr.filename), "")
                ours = f"{os.sep}svdcache{os.sep}" in caller
                (self.cur if self.cur is not None else self.outside).append((name, ours, os.path.basename(caller)))
            self.depth += 1
            try:
                return f(*a, **k)
            finally:
                self.depth -= 1

        return wrapped

    def start(self):
        self.cur = []

    def stop(self):
        self.calls.append(self.cur)
        self.cur = None


def run(model, inp, counter=None, steps=STEPS):
    """A bare Euler loop (no pipeline): timestep 1 -> 0 in ``steps`` calls."""
    h = inp["x"].clone()
    with torch.no_grad():
        for i in range(steps):
            if counter is not None:
                counter.start()
            v = model(hidden_states=h, encoder_hidden_states=inp["encoder_hidden_states"],
                      pooled_projections=inp["pooled_projections"], timestep=torch.full((B,), 1.0 - i / steps),
                      img_ids=inp["img_ids"], txt_ids=inp["txt_ids"], return_dict=False)[0]
            if counter is not None:
                counter.stop()
            h = h - v / steps
    return h


def basis_tensors(basis):
    out = {}
    for kind, feats in (("feature", basis.features), ("change", basis.changes or {})):
        for n, fb in feats.items():
            out[f"{kind}/{n}/V"] = fb.V.clone()
            out[f"{kind}/{n}/sigma"] = fb.sigma.clone()
            out[f"{kind}/{n}/k"] = torch.tensor(fb.k)
    return out


def reference(inp, out_dir):
    """Rank 0: the single-process runs every mode is compared with (no parallelism, no collective),
    and the offline basis, calibrated in one process and saved for every rank to load."""
    ref = build()
    res = {"sp_uncached": run(ref, inp)}
    basis = svdcache.calibrate(ref, run=lambda: run(ref, inp), progress=False)
    basis.save(os.path.join(out_dir, "basis.safetensors"))
    res["sp_basis"] = basis_tensors(basis)
    res["sp_basis_meta"] = {k: basis.meta.get(k) for k in ("gains", "schedules")}
    svdcache.enable(ref, basis=basis, interval=INTERVAL)
    res["sp_offline"] = run(ref, inp)
    res["sp_offline_stats"] = svdcache.stats(ref)
    svdcache.enable(ref, basis=basis, interval=INTERVAL, residual="reuse")
    res["sp_offline_reuse"] = run(ref, inp)
    # the zero-setup basis of an all-reduced Gram equals the single-process one to ~1e-6, which can flip
    # a 4-bit code of the kept residual: its parity is checked with the residual reused
    svdcache.enable(ref, interval=INTERVAL, residual="reuse")
    res["sp_online"] = run(ref, inp)
    res["sp_online_basis"] = basis_tensors(svdcache.current_basis(ref))
    return res


def enable_ring_on_cpu():
    """diffusers' ring attention merges per-chunk results through the log-sum-exp, which its
    "native" (SDPA) backend does not return and its flash / cuDNN backends (which do) need CUDA.
    On CPU the test gives the native op an exact math path for return_lse=True (layouts as the
    other backends: out (B, S, H, D), lse (B, S, H)); the communication pattern is diffusers' own."""
    import diffusers.models.attention_dispatch as AD

    orig = AD._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return orig(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                        _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        if attn_mask is not None or dropout_p or is_causal or enable_gqa:
            raise NotImplementedError("test ring op: plain attention only")
        q, k, v = (x.permute(0, 2, 1, 3).float() for x in (query, key, value))
        logits = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        lse = torch.logsumexp(logits, dim=-1)
        out = torch.softmax(logits, dim=-1) @ v
        return out.permute(0, 2, 1, 3).to(query.dtype), lse.permute(0, 2, 1)

    AD._native_attention_forward_op = forward_op


def parity(mode, inp, basis, counter, rank):
    """Everything measured under one context-parallel mode."""
    res: dict = {}
    if mode == "ring":
        enable_ring_on_cpu()
    m = build()
    m.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": 2}))
    cache_kw = dict(interval=INTERVAL)
    counter.outside = []
    res["cp_uncached"] = run(m, inp, counter)
    res["counts_uncached"], counter.calls = counter.calls, []

    # calibration under context parallelism: the ranks' Grams all-reduced before the eigh
    cp_basis = svdcache.calibrate(m, run=lambda: run(m, inp), progress=False)
    res["cp_basis"] = basis_tensors(cp_basis)
    res["cp_basis_meta"] = {k: cp_basis.meta.get(k) for k in ("gains", "schedules")}
    res["calibrate_outside"], counter.outside = counter.outside, []

    # offline basis (calibrated in one process, the same on every rank)
    svdcache.enable(m, basis=basis, **cache_kw)
    res["cp_offline"] = run(m, inp, counter)
    res["counts_offline"], counter.calls = counter.calls, []
    res["cp_offline_stats"] = svdcache.stats(m)
    allst = svdcache.stats(m, all_ranks=True)
    res["all_ranks_stats"] = {"per_rank": allst.cache_bytes_per_rank, "total": allst.cache_bytes_total,
                              "kind": allst.kind, "world": allst.world_size,
                              "identical": allst.identical_schedules, "text": str(allst),
                              "local_full": allst.last_generation.full_steps}
    res["stats_outside"], counter.outside = counter.outside, []
    svdcache.enable(m, basis=basis, **cache_kw, residual="reuse")  # exact parity (no 4-bit codes)
    res["cp_offline_reuse"] = run(m, inp)

    # zero-setup basis: built online from the first full steps; one all-reduce per feature
    svdcache.enable(m, **cache_kw, residual="reuse")
    res["cp_online"] = run(m, inp, counter)
    res["counts_online"], counter.calls = counter.calls, []
    res["cp_online_stats"] = svdcache.stats(m)
    res["cp_online_basis"] = basis_tensors(svdcache.current_basis(m))
    res["n_features"] = len(svdcache.stats(m).ranks)

    # the other order: svdcache enabled first, then enable_parallelism (its split hook then runs before
    # svdcache's root hook, which sees the rank's shard of the input)
    if mode == "ulysses":
        m2 = build()
        svdcache.enable(m2, basis=basis, **cache_kw)
        m2.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        from svdcache.runtime.distributed import sees_shards

        res["inner_sees_shards"] = sees_shards(m2, "svdcache")
        res["outer_sees_shards"] = sees_shards(m, "svdcache")
        res["inner_offline"] = run(m2, inp)
        res["inner_stats"] = svdcache.stats(m2)
        svdcache.enable(m2, basis=basis, **cache_kw, residual="reuse")
        res["inner_offline_reuse"] = run(m2, inp)
        svdcache.disable(m2)

    # a NaN forecast in rank 1's shard at the first cached step: the gathered output carries it to
    # every rank, so both fall back together and the collectives stay paired
    svdcache.enable(m, basis=basis, **cache_kw)
    hook = m._diffusers_hook.get_hook("svdcache")
    orig = hook.forecast
    hits = {"n": 0}

    def poisoned(name, **kw):
        out = orig(name, **kw)
        if rank == 1 and out is not None and hook.cur.cached_steps == 0 and hook.cur.fallbacks == 0:
            hits["n"] += 1
            for t in {id(t): t for t in (out, kw.get("out")) if t is not None}.values():
                t.fill_(float("nan"))  # in place: an adapter may keep using its out= buffer
        return out

    hook.forecast = poisoned
    # the whole-stack cached call sums the image stream's forecasts at once: poison that sum too
    import svdcache.fastpath.deferred as deferred_mod

    orig_flush = deferred_mod.DeferredSum.flush

    def poisoned_flush(self, h, x, out=None):
        y = orig_flush(self, h, x, out)
        if rank == 1 and h is hook and hook.cur.cached_steps == 0 and hook.cur.fallbacks == 0:
            hits["n"] += 1
            y.fill_(float("nan"))
        return y

    deferred_mod.DeferredSum.flush = poisoned_flush
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res["cp_nan"] = run(m, inp, counter)
    finally:
        deferred_mod.DeferredSum.flush = orig_flush
    res["counts_nan"], counter.calls = counter.calls, []
    res["nan_stats"] = svdcache.stats(m)
    res["nan_hits"] = hits["n"]
    svdcache.disable(m)
    return res, m


def tensor_parity(inp, counter):
    """Tensor parallelism (diffusers' Flux TP plan over 2 ranks): zero-setup cache vs one process.
    diffusers allows TP on CUDA / NPU / TPU / XPU meshes only; the test adds "cpu" to that list (the
    DTensor sharding and gloo collectives are torch's own on any device)."""
    import diffusers.hooks.tensor_parallel as TPm
    from diffusers import TensorParallelConfig

    if "cpu" not in TPm._SUPPORTED_TP_DEVICES:
        TPm._SUPPORTED_TP_DEVICES = (*TPm._SUPPORTED_TP_DEVICES, "cpu")
    res: dict = {}
    m = build()
    m.enable_parallelism(config=TensorParallelConfig(tp_degree=2))
    res["cp_uncached"] = run(m, inp, counter)
    res["counts_uncached"], counter.calls = counter.calls, []
    svdcache.enable(m, interval=INTERVAL, residual="reuse")  # as the single-process reference (see above)
    res["cp_online"] = run(m, inp, counter)
    res["counts_online"], counter.calls = counter.calls, []
    res["cp_online_basis"] = basis_tensors(svdcache.current_basis(m))
    res["cp_online_stats"] = svdcache.stats(m)
    allst = svdcache.stats(m, all_ranks=True)
    res["all_ranks_stats"] = {"per_rank": allst.cache_bytes_per_rank, "kind": allst.kind}
    svdcache.disable(m)
    return res


def main():
    scenario, modes, out_dir = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("DIST_TIMEOUT", 60))))
    rank = dist.get_rank()
    res: dict = {"rank": rank, "modes": modes}
    counter = CollectiveCounter()
    inp = inputs()
    cache_kw = dict(interval=INTERVAL)
    path = os.path.join(out_dir, f"rank{rank}.pt")

    if scenario == "parity":
        t0 = time.perf_counter()
        if rank == 0:
            res.update(reference(inp, out_dir))
        dist.barrier()
        basis = svdcache.load_basis(os.path.join(out_dir, "basis.safetensors"))  # every rank loads the file
        res["loaded_basis"] = basis_tensors(basis)
        for mode in modes:
            if mode == "tensor":
                res[mode] = tensor_parity(inp, counter)
            else:
                res[mode], m = parity(mode, inp, basis, counter, rank)
        res["seconds"] = time.perf_counter() - t0
        torch.save(res, path)
        # last: rank 1 raises inside a cached step; rank 0 must end on its own (nobody kills it)
        svdcache.enable(m, **cache_kw)
        hook = m._diffusers_hook.get_hook("svdcache")
        orig = hook.forecast

        def broken(name, **kw):
            if rank == 1:
                raise RuntimeError("injected failure on rank 1")
            return orig(name, **kw)

        hook.forecast = broken
        import svdcache.fastpath.deferred as deferred_mod

        orig_flush = deferred_mod.DeferredSum.flush

        def broken_flush(self, h, x, out=None):  # the whole-stack cached call's one sum
            if rank == 1:
                raise RuntimeError("injected failure on rank 1")
            return orig_flush(self, h, x, out)

        deferred_mod.DeferredSum.flush = broken_flush
        try:
            run(m, inp)
            print(f"rank {rank} finished the failing generation", flush=True)
            os._exit(0)
        except Exception as e:  # noqa: BLE001
            msg = str(e).splitlines()[0] if str(e) else ""
            print(f"rank {rank} ended with {type(e).__name__}: {msg}", flush=True)
            os._exit(3)
    elif scenario == "desync":
        m = build()
        m.enable_parallelism(config=ContextParallelConfig(**{f"{modes[0]}_degree": 2}))
        svdcache.enable(m, **cache_kw)
        hook = m._diffusers_hook.get_hook("svdcache")
        import svdcache.runtime.decider as H

        orig_first = H.first_tensor
        state = {"n": 0}

        def fake_first(out):  # rank 1 alone sees a "non-finite" output at its first cached step
            o = orig_first(out)
            if rank == 1 and hook.cur.fallbacks == 0 and hook.cur.cached_steps == 0 and o is not None:
                state["n"] += 1
                return o * float("nan")
            return o

        H.first_tensor = fake_first
        import warnings

        warnings.simplefilter("ignore")
        t0 = time.monotonic()
        try:
            out = run(m, inp, counter)
            res["finished"] = True
            res["out"] = out
            res["counts"] = counter.calls
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        res["seconds"] = time.monotonic() - t0
        res["stats"] = svdcache.stats(m)
        torch.save(res, path)
        print(f"rank {rank} desync result: {res.get('error', 'finished')}", flush=True)
        os._exit(0)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")


if __name__ == "__main__":
    main()
