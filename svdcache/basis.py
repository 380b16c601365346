"""The one-time SVD basis: per cached feature V (D, r) and sigma, saved as safetensors + metadata.
Where files are found and how they are written and checksummed: :mod:`svdcache.basis_io`."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch

from svdcache_kernels import rank_for_energy

from .basis_io import (CHECKSUM_KEY, FILENAME, FORMAT, FORMAT_VERSION, checksum, checksum_v1, local_basis_file,
                       looks_like_repo_id, read_safetensors, resolve, write_atomically)

ORTHO_TOL = 1e-3  # fp32 calibration gives ~1e-6; a damaged or rescaled V is far off


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_features(path: str, meta: dict) -> dict:
    """The 'features' metadata field: {name: {"D": int, "k": int, "stored_rank": int, "dk": int}}."""
    if "features" not in meta:
        raise ValueError(f"{path}: metadata field 'features' is missing; recalibrate or save the basis again")
    raw = meta["features"]
    try:
        shapes = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{path}: metadata field 'features' is not valid JSON ({e}); recalibrate or save the "
                         "basis again") from None
    if not isinstance(shapes, dict) or not shapes:
        raise ValueError(f"{path}: metadata field 'features' must be a non-empty object of feature name -> "
                         f"shape, got {type(shapes).__name__}")
    for name, s in shapes.items():
        if not isinstance(s, dict):
            raise ValueError(f"{path}: metadata field 'features'[{name!r}] must be an object, got {type(s).__name__}")
        for key in ("D", "k"):
            if key not in s:
                raise ValueError(f"{path}: metadata field 'features'[{name!r}] has no {key!r}")
        for key in ("D", "k", "stored_rank", "dk"):
            if key in s and (not _is_int(s[key]) or s[key] < 1):
                raise ValueError(f"{path}: metadata field 'features'[{name!r}][{key!r}] must be an integer >= 1, "
                                 f"got {s[key]!r}")
    return shapes


def _check_gains(path: str, gains) -> None:
    """Fitted gains: {feature: {key: g}} with g finite in [0, 2] (the range fit_gains clips to)."""
    if gains is None:
        return
    if not isinstance(gains, dict):
        raise ValueError(f"{path}: metadata field 'gains' must be an object of feature -> {{key: gain}}, "
                         f"got {type(gains).__name__}")
    for name, table in gains.items():
        if not isinstance(table, dict):
            raise ValueError(f"{path}: metadata field 'gains'[{name!r}] must be an object, got {type(table).__name__}")
        for key, g in table.items():
            if not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g) or not 0.0 <= g <= 2.0:
                raise ValueError(f"{path}: metadata field 'gains'[{name!r}][{key!r}] = {g!r} is not a number in "
                                 "[0, 2] (the range calibration fits); recalibrate")


def _check_feature(where: str, name: str, kind: str, fb: "FeatureBasis", D: int | None) -> None:
    sk = "sigma" if kind == "V" else "dsigma"
    V, sigma = fb.V, fb.sigma
    stamp = (V.data_ptr(), V._version, tuple(V.shape), sigma.data_ptr(), sigma._version, fb.k)
    if getattr(fb, "_checked", None) == stamp:
        return

    def bad(field, what):
        return ValueError(f"{where}: feature {name!r}: {field} {what}; recalibrate or save the basis again")

    if not isinstance(V, torch.Tensor) or V.dim() != 2:
        raise bad(kind, f"must be a 2-D tensor (D, r), got {getattr(V, 'shape', type(V).__name__)}")
    if not V.is_floating_point():
        raise bad(kind, f"has dtype {V.dtype}, not a float dtype")
    if D is not None and V.shape[0] != D:
        raise bad(kind, f"has {V.shape[0]} rows but metadata says D={D}")
    r = V.shape[1]
    if r < 1:
        raise bad(kind, "has 0 columns (an empty basis)")
    if not bool(torch.isfinite(V).all()):
        raise bad(kind, "holds non-finite values")
    G = V.double().T @ V.double()
    err = float((G - torch.eye(r, dtype=G.dtype, device=G.device)).abs().max())
    if not err <= ORTHO_TOL:
        raise bad(kind, f"does not have orthonormal columns (max |V^T V - I| = {err:.3g} > {ORTHO_TOL:g})")
    if not isinstance(sigma, torch.Tensor) or sigma.dim() != 1 or not sigma.is_floating_point():
        raise bad(sk, f"must be a 1-D float tensor, got {getattr(sigma, 'dtype', type(sigma).__name__)} "
                  f"{tuple(getattr(sigma, 'shape', ()))}")
    if sigma.numel() < r:
        raise bad(sk, f"has {sigma.numel()} values for {r} columns")
    if not bool(torch.isfinite(sigma).all()) or bool((sigma < 0).any()):
        raise bad(sk, "holds negative or non-finite values")
    head = sigma[: max(r, sigma.numel() - 1)].double()  # an online basis ends with one residual-energy lump
    if bool((head[1:] > head[:-1] * (1 + 1e-5) + 1e-30).any()):
        raise bad(sk, "is not non-increasing")
    if not _is_int(fb.k) or not 1 <= fb.k <= r:
        raise bad("k" if kind == "V" else "dk", f"= {fb.k!r} is not an integer in [1, {r}] (the stored columns)")
    fb._checked = stamp


def _read(path: str) -> tuple[dict, dict]:
    """(metadata, tensors) of an svdcache basis file; a ValueError naming it if it is none."""
    try:
        meta, tensors = read_safetensors(path)
    except OSError:
        raise
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ValueError(f"{path} is not a readable svdcache basis file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not an svdcache basis (metadata format={meta.get('format')!r})")
    return meta, tensors


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
        """Write the basis (format 2: a checksum over every stored field). Errors are one-line OSErrors
        naming ``path`` (its directory missing or not writable, ``path`` a directory)."""
        from safetensors.torch import save_file

        tensors, shapes, seen = {}, {}, set()

        def put(key, t):
            t = t.detach().float().contiguous().cpu()
            if t.data_ptr() in seen:  # the zero-setup basis: its change subspace is the feature subspace
                t = t.clone()  # safetensors refuses tensors that share memory
            seen.add(t.data_ptr())
            tensors[key] = t

        for name, fb in self.features.items():
            put(f"{name}::V", fb.V)
            put(f"{name}::sigma", fb.sigma)
            shapes[name] = {"D": fb.D, "k": fb.k, "stored_rank": fb.V.shape[1]}
            cb = self.changes.get(name)
            if cb is not None:
                put(f"{name}::dV", cb.V)
                put(f"{name}::dsigma", cb.sigma)
                shapes[name]["dk"] = cb.k
        meta = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in self.meta.items()}
        meta.update(format=FORMAT, format_version=FORMAT_VERSION, features=json.dumps(shapes))
        meta[CHECKSUM_KEY] = checksum(tensors, meta)  # over every tensor and every metadata field
        # a temporary file of its own, then os.replace: no half-written basis, no collision between savers
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Basis":
        """Read a basis file and check it (see :meth:`check`); every error is a ValueError naming the
        file and the field. A file that loads cannot make a wrong image through its numbers."""
        path = local_basis_file(path)  # a folder or a missing path: one line naming it
        meta, tensors = _read(path)
        raw_meta = dict(meta)  # the checksum is over the fields as stored
        shapes = _parse_features(path, meta)
        features, changes = {}, {}
        for name, s in shapes.items():
            for key in ("V", "sigma") + (("dV", "dsigma") if "dk" in s else ()):
                if f"{name}::{key}" not in tensors:
                    raise ValueError(f"{path}: feature {name!r} is listed but its tensor {key!r} is missing; "
                                     "recalibrate or save the basis again")
            features[name] = FeatureBasis(V=tensors[f"{name}::V"], sigma=tensors[f"{name}::sigma"], k=s["k"])
            if "dk" in s:
                changes[name] = FeatureBasis(V=tensors[f"{name}::dV"], sigma=tensors[f"{name}::dsigma"], k=s["dk"])
        for key in ("tau", "steps", "feature_shapes", "gains", "images", "schedules", "choice"):
            if key in meta:
                try:
                    meta[key] = json.loads(meta[key])
                except ValueError:
                    if key in ("gains", "choice"):
                        raise ValueError(f"{path}: metadata field {key!r} is not valid JSON; "
                                         "recalibrate or delete the field") from None
        _check_gains(path, meta.get("gains"))
        from .choice import check_choice

        check_choice(meta.get("choice"), path)
        from .schedule_search import check_schedules

        check_schedules(meta.get("schedules"), path)
        basis = cls(features=features, meta=meta, changes=changes)
        basis.check(where=path, dims={n: s["D"] for n, s in shapes.items()})
        for name, s in shapes.items():
            if "stored_rank" in s and s["stored_rank"] != features[name].V.shape[1]:
                raise ValueError(f"{path}: feature {name!r}: metadata field 'stored_rank' says {s['stored_rank']} "
                                 f"columns but V has {features[name].V.shape[1]}; recalibrate or save the basis again")
        basis.source = path  # errors at enable name the file
        verify_checksum(path, tensors, raw_meta)
        meta.pop(CHECKSUM_KEY, None)
        meta.pop("format", None)
        meta.pop("features", None)
        if str(device) != "cpu":
            for fb in (*features.values(), *changes.values()):
                fb.V, fb.sigma = fb.V.to(device), fb.sigma.to(device)
        return basis

    @classmethod
    def from_pretrained(cls, repo_or_dir, subfolder: str | None = None, filename: str = FILENAME,
                        revision: str | None = None, device: str | torch.device = "cpu", **hub_kwargs) -> "Basis":
        """A basis from a file, a folder (``[subfolder/]svdcache_basis.safetensors``) or a Hub repo id
        (``revision=``, ``filename=``, huggingface_hub's ``cache_dir``, ``token``, offline mode); see
        :mod:`svdcache.hub` and :func:`svdcache.basis_io.resolve`."""
        local = resolve(repo_or_dir, subfolder, filename, revision, **hub_kwargs)
        basis = cls.load(local, device=device)
        if looks_like_repo_id(repo_or_dir):
            basis.meta.setdefault("hub_repo", os.fspath(repo_or_dir))
        return basis

    def check(self, where: str = "basis", dims: dict[str, int] | None = None) -> None:
        """Raise a ValueError (naming ``where``, the feature and the field) unless every feature's
        basis is usable: float, finite, at least one column, orthonormal columns (|V^T V - I| <=
        ORTHO_TOL), sigma finite, non-negative, non-increasing over the stored columns and at least
        that long, and k within the stored columns."""
        if self.changes and set(self.changes) != set(self.features):
            odd = sorted(set(self.changes) ^ set(self.features))
            raise ValueError(f"{where}: feature {odd[0]!r} has a feature subspace but no change subspace (or the other "
                             f"way round; {len(odd)} such features); recalibrate or save the basis again")
        for kind, group in (("V", self.features), ("dV", self.changes)):
            for name, fb in group.items():
                _check_feature(where, name, kind, fb, None if dims is None else dims.get(name))

    def validate(self, model: torch.nn.Module, feature_dims: dict[str, int]) -> None:
        """Raise a ValueError naming the feature if this basis does not fit ``model``."""
        cls_name = type(model).__name__
        src = getattr(self, "source", None)
        where = "basis" if src is None else f"basis from {src}"
        if self.meta.get("model_class") and self.meta["model_class"] != cls_name:
            raise ValueError(f"{where} was calibrated on {self.meta['model_class']}, not on {cls_name}")
        for name, D in feature_dims.items():
            if name not in self.features:
                raise ValueError(
                    f"{where} has no feature {name!r} (it holds {len(self)} features, e.g. "
                    f"{next(iter(self.features), None)!r}); calibrate this model with the same granularity"
                )
            if self.features[name].D != D:
                raise ValueError(f"{where}: feature {name!r}: basis has D={self.features[name].D} but the model has D={D}")
        self.check(where=where, dims=feature_dims)  # a hand-made or edited Basis: refused before any call
        fp = self.meta.get("config_fingerprint")
        if fp and fp != config_fingerprint(model):
            import warnings

            warnings.warn(
                f"{where} was calibrated on a {cls_name} with another config (fingerprint {fp} vs "
                f"{config_fingerprint(model)}); its features fit, so it is used",
                stacklevel=3,
            )


def verify_checksum(path: str, tensors: dict, meta: dict) -> None:
    """Refuse (ValueError naming the file and the fix) unless ``meta`` holds a format-2 checksum that
    matches every stored tensor and metadata field."""
    version, want = meta.get("format_version"), meta.get(CHECKSUM_KEY)
    if want is None:
        raise ValueError(f"{path} has no checksum (removed, or written by another tool), so an edit of it cannot be "
                         f"seen; recalibrate, or if you trust the file re-save it with "
                         f"svdcache.basis.resave({path!r}, trust=True)")
    if version == "1":
        raise ValueError(f"{path} is in basis format 1, whose checksum does not cover the schedules and most "
                         f"metadata; re-save it once with svdcache.basis.resave({path!r}) or recalibrate")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: metadata field 'format_version' is {version!r}, not a basis format this svdcache "
                         f"reads ({FORMAT_VERSION}); upgrade svdcache or recalibrate")
    if want != checksum(tensors, meta):
        raise ValueError(f"{path}: the tensors or metadata do not match the checksum saved with them (the file "
                         "was modified or damaged after it was saved); recalibrate or save the basis again")


def resave(path: str | os.PathLike, out: str | os.PathLike | None = None, *, trust: bool = False) -> str:
    """Rewrite a basis file in the current format (a checksum over every stored field) with every
    tensor and metadata value unchanged; writes ``out`` (default: in place) and returns its path.
    A format-1 file's own checksum is verified first; a file without a checksum is rewritten only
    with ``trust=True``. The result is loaded and checked before it replaces anything."""
    from safetensors.torch import save_file

    path = local_basis_file(path)
    out = path if out is None else os.fspath(out)
    meta, tensors = _read(path)
    version, want = meta.get("format_version"), meta.get(CHECKSUM_KEY)
    if want is None and not trust:
        raise ValueError(f"{path} has no checksum: pass trust=True to re-save it as it is, or recalibrate")
    if want is not None and version == "1" and want != checksum_v1(tensors, meta):
        raise ValueError(f"{path}: the tensors or metadata do not match its format-1 checksum (modified or damaged "
                         "after it was saved); recalibrate")
    if want is not None and version == FORMAT_VERSION:
        verify_checksum(path, tensors, meta)
    elif want is not None and version != "1":
        raise ValueError(f"{path}: metadata field 'format_version' is {version!r}; upgrade svdcache or recalibrate")
    meta["format_version"] = FORMAT_VERSION
    meta[CHECKSUM_KEY] = checksum(tensors, meta)

    def write(tmp):
        save_file(tensors, tmp, metadata=meta)
        try:
            Basis.load(tmp)  # every structural check, before anything is replaced
        except ValueError as e:
            raise ValueError(str(e).replace(tmp, path)) from None

    write_atomically(out, write)
    return out


def load_basis(path: str | os.PathLike, device: str | torch.device = "cpu") -> Basis:
    """Load a basis saved by :meth:`Basis.save` (or from a Hub repo id ``org/name``, see
    :meth:`Basis.from_pretrained`); errors name the file and what is wrong."""
    if looks_like_repo_id(path):
        return Basis.from_pretrained(path, device=device)
    return Basis.load(path, device=device)
