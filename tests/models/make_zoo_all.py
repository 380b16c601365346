"""Writes tests/models/zoo_all.py from diffusers' own model tests (run by hand, not in CI).

    git clone https://github.com/huggingface/diffusers /tmp/d && mkdir /tmp/dtests && \
      (cd /tmp/d && git archive HEAD tests/__init__.py tests/testing_utils.py tests/models | tar -x -C /tmp/dtests)
    python tests/models/make_zoo_all.py /tmp/dtests

The test modules are imported with accelerate / parameterized / peft stubbed (only their configs and
dummy inputs are used); each class's first config is taken (quantization / variant configs skipped).
"""
import os
import sys

DTESTS = sys.argv[1] if len(sys.argv) > 1 else "/tmp/dtests"
import types, importlib.abc, importlib.machinery
from unittest import mock
STUB = ("accelerate", "parameterized", "peft", "pytest_timeout")
class _Mod(types.ModuleType):
    def __getattr__(self, k):
        if k.startswith("__"): raise AttributeError(k)
        m = mock.MagicMock(name=f"{self.__name__}.{k}")
        return m
class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUB:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = _Mod(spec.name); m.__path__ = []; return m
    def exec_module(self, m): pass
sys.meta_path.insert(0, Finder())

import importlib, inspect, os, pprint
sys.path.insert(0, DTESTS)
import torch
from tests.models.testing_utils import BaseModelTesterConfig
import diffusers.models.transformers as T
WANT = {n for n in dir(T) if "Transformer" in n}
EXTRA = {"HunyuanDiT2DModel", "StableAudio3DiTModel", "LuminaNextDiT2DModel"}
SKIP_CFG = ("Quant", "SDNQ", "KVCache", "I2V", "TokenReplace", "VideoToWorld", "SD35", "CogVideoX15")
TIME_KEYS = ("timestep", "timesteps", "t", "vision_timesteps")

def src(v, key, main):
    if isinstance(v, torch.Tensor):
        dt = str(v.dtype).replace("torch.", "")
        if v.is_floating_point() and key != main and v.numel() > 8 and bool((v == v.round()).all()):
            if bool((v == 1).all()):
                return f"ones{tuple(v.shape)!r}"  # masks of ones
            return f"T({v.tolist()!r}, {dt!r})"
        literal = (not v.is_floating_point()) or (v.numel() <= 8 and key != main) or key in TIME_KEYS
        if literal:
            return f"T({v.tolist()!r}, {dt!r})"
        return f"R{tuple(v.shape)!r}" if dt == "float32" else f"R{tuple(v.shape)!r}"  # float32 only here
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k!r}: {src(x, key, main)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(src(x, key, main) for x in v) + "]"
    if isinstance(v, tuple):
        return "(" + ", ".join(src(x, key, main) for x in v) + ("," if len(v) == 1 else "") + ")"
    if isinstance(v, (int, float, bool, str)) or v is None:
        return repr(v)
    return f"F({type(v).__module__ + '.' + type(v).__name__!r})"  # a factory: fresh object per call

entries = {}
files = sorted(f[:-3] for f in os.listdir(os.path.join(DTESTS, "tests/models/transformers")) if f.startswith("test_"))
for m in files:
    mod = importlib.import_module(f"tests.models.transformers.{m}")
    for name, cls in vars(mod).items():
        if not inspect.isclass(cls) or cls.__module__ != mod.__name__ or not issubclass(cls, BaseModelTesterConfig):
            continue
        if name.startswith("Test") or any(s in name for s in SKIP_CFG):
            continue
        cfg = cls()
        mc = cfg.model_class.__name__
        if mc in entries or (mc not in WANT and mc not in EXTRA):
            continue
        init = cfg.get_init_dict()
        try:
            inp = cfg.get_dummy_inputs(batch_size=1)
        except TypeError:
            inp = cfg.get_dummy_inputs()
        if mc == "HiDreamImageTransformer2DModel":
            inp = cfg.get_dummy_inputs(batch_size=2)
        main = getattr(cfg, "main_input_name", "hidden_states")
        if mc == "PRXTransformer2DModel":  # the test's width 1792 / 28 heads: ~60 s per check on 2 cores
            init = dict(init, context_in_dim=64, hidden_size=64, num_heads=2, depth=2, axes_dim=[16, 16])
            inp["encoder_hidden_states"] = inp["encoder_hidden_states"][..., :64]
        tkey = next((k for k in TIME_KEYS if k in inp), None)
        if mc == "PriorTransformer":
            tkey = "timestep"
        if kw := "kv_cache" in inp:
            if getattr(inp["kv_cache"], "num_layers", None) is None:
                pass
        ins = ",\n            ".join(f"{k!r}: {src(v, k, main)}" for k, v in inp.items())
        entries[mc] = (m, name, init, ins, main, tkey)
        print(mc, main, tkey)

out = ['''"""Tiny configs and inputs for the transformer classes of diffusers (every class exported from
diffusers.models.transformers with "Transformer" in its name that has a model test, plus three DiTs
named otherwise), copied from diffusers' own model tests (tests/models/transformers/test_models_*.py:
``get_init_dict`` / ``get_dummy_inputs``, batch 1 where the test allows it; PRX at width 64 instead
of the test's 1792). Written once from those tests by a script and kept here as data: no download at
test time.

``R(*shape)`` is a fresh standard-normal float tensor per call (``inputs(name, seed)``); ``T(values,
dtype)`` a literal tensor (ids, indices, masks, timesteps); ``F(path)`` a fresh object of that class.
Each entry: ``init`` (model kwargs), ``inputs`` (forward kwargs), ``main`` (the latent argument),
``timestep`` (the argument the denoising loop lowers each step), ``source`` (the diffusers test).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class R:
    shape: tuple

    def __init__(self, *shape):
        object.__setattr__(self, "shape", tuple(shape))


@dataclass(frozen=True)
class T:
    values: object
    dtype: str
    shape: tuple | None = None  # set: ``values`` broadcast to it (masks of ones)


@dataclass(frozen=True)
class F:
    path: str


def ones(*shape) -> T:
    return T([1.0], "float32", tuple(shape))


@dataclass
class Entry:
    init: dict
    inputs: dict
    main: str = "hidden_states"
    timestep: str | None = "timestep"
    source: str = ""
    extra: bool = False  # not named "...Transformer..." in diffusers


ZOO: dict[str, Entry] = {}
''']
for mc, (m, name, init, ins, main, tkey) in entries.items():
    init_src = pprint.pformat(init, width=100, sort_dicts=False).replace("\n", "\n        ")
    out.append(f'''
ZOO[{mc!r}] = Entry(
    init={init_src},
    inputs={{
            {ins},
    }},
    main={main!r}, timestep={tkey!r}, source={m + ".py::" + name!r}{", extra=True" if mc in EXTRA else ""},
)
''')
out.append('''

def _make(spec, gen: torch.Generator):
    if isinstance(spec, T) and spec.shape is not None:
        return torch.tensor(spec.values, dtype=getattr(torch, spec.dtype)).expand(spec.shape).clone()
    if isinstance(spec, R):
        return torch.randn(spec.shape, generator=gen)
    if isinstance(spec, T):
        return torch.tensor(spec.values, dtype=getattr(torch, spec.dtype))
    if isinstance(spec, F):
        mod, _, cls = spec.path.rpartition(".")
        return _factory(getattr(importlib.import_module(mod), cls))
    if isinstance(spec, dict):
        return {k: _make(v, gen) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_make(v, gen) for v in spec]
    if isinstance(spec, tuple):
        return tuple(_make(v, gen) for v in spec)
    return spec


def _factory(cls):
    import inspect

    params = [p for p in inspect.signature(cls).parameters.values() if p.default is inspect.Parameter.empty]
    return cls(*[_NUM_LAYERS] * len(params))


_NUM_LAYERS = 2  # the only factory-made input (WanAnimate2's KV cache) takes the number of layers


def inputs(name: str, seed: int = 0) -> dict:
    """Fresh forward kwargs of class ``name`` (random tensors drawn from ``seed``)."""
    return _make(ZOO[name].inputs, torch.Generator().manual_seed(seed))


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of class ``name``, weights from ``seed``, in eval mode."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        from diffusers.models import transformers as _T

        cls = getattr(_T, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**ZOO[name].init)
    return model.eval()


NAMES = tuple(ZOO)
''')
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo_all.py"), "w").write("".join(out))
print(len(entries))
