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
import re
import tempfile

import torch

FILENAME = "svdcache_basis.safetensors"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_repo_id(name) -> bool:
    """``org/name`` that is not an existing local path."""
    s = os.fspath(name) if isinstance(name, os.PathLike) else name
    return isinstance(s, str) and bool(_REPO_ID.match(s)) and not os.path.exists(s)


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


def resolve(repo_or_dir, subfolder: str | None = None, filename: str = FILENAME, revision: str | None = None,
            cache_dir=None, token=None, local_files_only: bool | None = None) -> str:
    """The local path of the basis file: a file, a folder holding ``[subfolder/]filename``, or a Hub
    repo id (downloaded through huggingface_hub's cache; offline mode reads the cache only)."""
    p = os.fspath(repo_or_dir)
    if os.path.isfile(p):
        return p
    if os.path.isdir(p):
        path = os.path.join(p, subfolder or "", filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"svdcache: no basis file {os.path.join(subfolder or '', filename)!r} in folder {p}")
        return path
    if not looks_like_repo_id(p):
        raise FileNotFoundError(f"svdcache: {p!r} is neither a basis file, a folder nor a Hub repo id (org/name)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return hf_hub_download(p, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                               token=token, local_files_only=bool(local_files_only))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"svdcache: {p}/{os.path.join(subfolder or '', filename)} is not in the local Hugging Face cache and "
            "the Hub cannot be reached (offline mode or no network): download it once online"
        ) from None
    except (EntryNotFoundError, RepositoryNotFoundError) as e:
        raise FileNotFoundError(f"svdcache: no basis {os.path.join(subfolder or '', filename)!r} in Hub repo "
                                f"{p!r} ({type(e).__name__})") from None


def from_pretrained(repo_or_dir, subfolder: str | None = None, filename: str = FILENAME,
                    revision: str | None = None, device: str | torch.device = "cpu", **hub_kwargs):
    """Load a basis from a file, a folder or a Hub repo (see :func:`resolve`)."""
    from .basis import Basis

    path = resolve(repo_or_dir, subfolder, filename, revision, **hub_kwargs)
    basis = Basis.load(path, device=device)
    if looks_like_repo_id(os.fspath(repo_or_dir)):
        basis.meta.setdefault("hub_repo", os.fspath(repo_or_dir))
    return basis


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
