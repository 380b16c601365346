"""Bases on the Hugging Face Hub convention: a basis file in a model repo (or a local folder), found
by repo id, optional ``subfolder`` and ``revision``, through huggingface_hub (so its cache, offline
mode ``HF_HUB_OFFLINE=1`` and tokens work as for diffusers weights).

    basis = svdcache.load_basis("org/flux-dev-svdcache")               # repo id
    basis = svdcache.Basis.from_pretrained("org/repo", subfolder="transformer")
    svdcache.push_to_hub(basis, "me/flux-dev-svdcache")

The basis records the model it was calibrated on (``model_id``, ``model_revision``; see
:func:`model_identity`), so a file found on the Hub says what it belongs to.
"""
from __future__ import annotations

import os
import tempfile

import torch

from .basis import Basis
from .basis_io import FILENAME, looks_like_repo_id, resolve  # noqa: F401  (the Hub path lives in basis_io)


def model_identity(model) -> dict:
    """``model_id`` / ``model_revision`` of a diffusers model or pipeline, where diffusers recorded
    them (``_name_or_path`` of the config; the commit hash of a Hub download)."""
    out = {}
    for obj in (model, getattr(model, "transformer", None)):
        cfg = getattr(obj, "config", None)
        if cfg is None:
            continue
        get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
        name = get("_name_or_path", None)
        if name and "model_id" not in out:
            out["model_id"] = str(name)
        rev = get("_commit_hash", None) or getattr(obj, "_commit_hash", None)
        if rev and "model_revision" not in out:
            out["model_revision"] = str(rev)
    return out


def from_pretrained(repo_or_dir, subfolder: str | None = None, filename: str = FILENAME,
                    revision: str | None = None, device: str | torch.device = "cpu", **hub_kwargs) -> Basis:
    """Load a basis from a file, a folder or a Hub repo (see :func:`svdcache.basis_io.resolve`)."""
    return Basis.from_pretrained(repo_or_dir, subfolder, filename, revision, device=device, **hub_kwargs)


def push_to_hub(basis, repo_id: str, subfolder: str | None = None, filename: str = FILENAME, *,
                model=None, revision: str | None = None, token=None, private: bool | None = None,
                commit_message: str | None = None, create_repo: bool = True) -> str:
    """Upload ``basis`` as ``[subfolder/]filename`` of Hub repo ``repo_id`` (created if missing).
    ``model``: the model it was calibrated on, to record its id and revision in the file if the
    basis does not say yet. Returns the URL of the commit."""
    from huggingface_hub import HfApi

    if not looks_like_repo_id(repo_id):
        raise ValueError(f"svdcache: push_to_hub needs a repo id 'org/name', got {repo_id!r}")
    if model is not None:
        for k, v in model_identity(model).items():
            basis.meta.setdefault(k, v)
    api = HfApi(token=token)
    if create_repo:
        api.create_repo(repo_id, private=private, exist_ok=True)
    path_in_repo = "/".join(p for p in (subfolder, filename) if p)
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, filename)
        basis.save(local)
        info = api.upload_file(path_or_fileobj=local, path_in_repo=path_in_repo, repo_id=repo_id, revision=revision,
                               commit_message=commit_message or f"svdcache basis ({len(basis)} features, "
                               f"{basis.meta.get('model_class', 'model')})")
    return str(getattr(info, "commit_url", info))
