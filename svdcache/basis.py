"""The one-time SVD basis: per cached feature V (D, r) and sigma, saved as safetensors + metadata."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from svdcache_kernels import rank_for_energy

FORMAT = "svdcache-basis"
FORMAT_VERSION = "1"


def config_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's architecture config (paths and versions left out)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return ""
    items = {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    blob = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class FeatureBasis:
    V: torch.Tensor  # (D, r) fp32, columns by descending sigma
    sigma: torch.Tensor  # (D,) fp32: every singular value, so any tau can be judged
    k: int  # rank chosen at calibration

    @property
    def D(self) -> int:
        return self.V.shape[0]

    def rank(self, tau: float | None = None, k: int | None = None) -> int:
        """k for energy ``tau`` or fixed ``k``, within the stored columns."""
        want = rank_for_energy(self.sigma, tau) if k is None else int(k)
        return max(1, min(want, self.V.shape[1]))

    def energy(self, k: int) -> float:
        e = self.sigma.double() ** 2
        return float(e[:k].sum() / e.sum().clamp_min(1e-300))


@dataclass
class Basis:
    """Per-feature bases of one model, as produced by :func:`svdcache.calibrate`."""

    features: dict[str, FeatureBasis]
    meta: dict = field(default_factory=dict)
    changes: dict[str, FeatureBasis] = field(default_factory=dict)  # subspaces of F_t - F_t-1

    def subspace(self, kind: str = "feature") -> dict[str, FeatureBasis]:
        """The per-feature bases of the feature subspace or of the change subspace."""
        if kind == "feature":
            return self.features
        if not self.changes:
            raise ValueError("this basis holds no change subspace (calibrate it with svdcache >= 0.1 to get one)")
        return self.changes

    def __len__(self) -> int:
        return len(self.features)

    def __repr__(self) -> str:
        ks = [f.k for f in self.features.values()]
        return (f"Basis({self.meta.get('model_class', '?')}, {len(self)} features, "
                f"k {min(ks, default=0)}..{max(ks, default=0)}, tau={self.meta.get('tau')})")

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors, shapes = {}, {}
        for name, fb in self.features.items():
            tensors[f"{name}::V"] = fb.V.detach().float().contiguous().cpu()
            tensors[f"{name}::sigma"] = fb.sigma.detach().float().contiguous().cpu()
            shapes[name] = {"D": fb.D, "k": fb.k, "stored_rank": fb.V.shape[1]}
            cb = self.changes.get(name)
            if cb is not None:
                tensors[f"{name}::dV"] = cb.V.detach().float().contiguous().cpu()
                tensors[f"{name}::dsigma"] = cb.sigma.detach().float().contiguous().cpu()
                shapes[name]["dk"] = cb.k
        meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in self.meta.items()}
        meta.update(format=FORMAT, format_version=FORMAT_VERSION, features=json.dumps(shapes))
        tmp = f"{os.fspath(path)}.tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)  # never leave a half-written basis behind

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Basis":
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no basis file at {path}")
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types for a damaged file
            raise ValueError(f"{path} is not a readable svdcache basis file ({type(e).__name__}: {e})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is a safetensors file but not an svdcache basis (metadata format={meta.get('format')!r})")
        shapes = json.loads(meta.pop("features"))
        features, changes = {}, {}
        for name, s in shapes.items():
            try:
                V, sigma = tensors[f"{name}::V"], tensors[f"{name}::sigma"]
            except KeyError:
                raise ValueError(f"{path}: feature {name!r} is listed but its tensors are missing") from None
            if V.dim() != 2 or V.shape[0] != s["D"] or sigma.numel() < V.shape[1] or not torch.isfinite(V).all():
                raise ValueError(f"{path}: feature {name!r} is damaged (V {tuple(V.shape)}, sigma {tuple(sigma.shape)})")
            features[name] = FeatureBasis(V=V, sigma=sigma, k=int(s["k"]))
            if "dk" in s:
                dV, dsigma = tensors.get(f"{name}::dV"), tensors.get(f"{name}::dsigma")
                if dV is None or dsigma is None or dV.dim() != 2 or dV.shape[0] != s["D"] or not torch.isfinite(dV).all():
                    raise ValueError(f"{path}: the change subspace of feature {name!r} is damaged or missing")
                changes[name] = FeatureBasis(V=dV, sigma=dsigma, k=int(s["dk"]))
        for key in ("tau", "steps", "feature_shapes", "gains", "images"):
            if key in meta:
                try:
                    meta[key] = json.loads(meta[key])
                except ValueError:
                    pass
        meta.pop("format", None)
        return cls(features=features, meta=meta, changes=changes)

    def validate(self, model: torch.nn.Module, feature_dims: dict[str, int]) -> None:
        """Raise a ValueError naming the feature if this basis does not fit ``model``."""
        cls_name = type(model).__name__
        if self.meta.get("model_class") and self.meta["model_class"] != cls_name:
            raise ValueError(f"basis was calibrated on {self.meta['model_class']}, not on {cls_name}")
        for name, D in feature_dims.items():
            if name not in self.features:
                raise ValueError(
                    f"basis has no feature {name!r} (it holds {len(self)} features, e.g. "
                    f"{next(iter(self.features), None)!r}); calibrate this model with the same granularity"
                )
            if self.features[name].D != D:
                raise ValueError(f"feature {name!r}: basis has D={self.features[name].D} but the model has D={D}")
        fp = self.meta.get("config_fingerprint")
        if fp and fp != config_fingerprint(model):
            import warnings

            warnings.warn(
                f"basis was calibrated on a {cls_name} with another config (fingerprint {fp} vs "
                f"{config_fingerprint(model)}); its features fit, so it is used",
                stacklevel=3,
            )


def load_basis(path: str | os.PathLike, device: str | torch.device = "cpu") -> Basis:
    """Load a basis saved by :meth:`Basis.save`; errors name the file and what is wrong."""
    return Basis.load(path, device=device)
