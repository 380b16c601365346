"""Where a basis file is and how it is written: local files, folders and Hub repo ids resolved to one
local path, the checksum over every stored field, and atomic writes. Imports nothing of svdcache
(svdcache.basis and svdcache.hub both build on it), and no torch at import time.

The checksum (basis format 2) is a sha256 over every tensor (name, dtype, shape, raw bytes) and every
metadata field but itself (schedules, gains, granularity, model class, ...): an edit anywhere in a
saved file is refused at load. Format 1 files (svdcache 0.1.0) carried a checksum over the tensors
and four metadata fields only; :func:`svdcache.basis.resave` rewrites one as format 2, values unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets

FORMAT = "svdcache-basis"
FORMAT_VERSION = "2"  # 2: the checksum covers every stored field; 1: tensors and 4 metadata fields
CHECKSUM_KEY = "checksum"
CHECKSUM_PREFIX = "sha256:"
FILENAME = "svdcache_basis.safetensors"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_repo_id(name) -> bool:
    """``org/name`` that is not an existing local path."""
    s = os.fspath(name) if isinstance(name, os.PathLike) else name
    return isinstance(s, str) and bool(_REPO_ID.match(s)) and not os.path.exists(s)


# -- the checksum -----------------------------------------------------------------------------------
def _tensor_bytes(t) -> bytes:
    t = t.detach().contiguous().cpu().reshape(-1)
    import torch

    return t.view(torch.uint8).numpy().tobytes()  # the values exactly as stored, any dtype


def checksum(tensors: dict, meta: dict) -> str:
    """sha256 over every tensor (name, dtype, shape, raw bytes) and every metadata field except the
    checksum itself, as stored in the file (metadata values are strings)."""
    h = hashlib.sha256(b"svdcache-basis checksum, format 2\n")

    def put(blob: bytes):
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)

    for key in sorted(tensors):
        t = tensors[key]
        put(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        put(_tensor_bytes(t))
    put(json.dumps(sorted([k, v] for k, v in meta.items() if k != CHECKSUM_KEY)).encode())
    return CHECKSUM_PREFIX + h.hexdigest()


def checksum_v1(tensors: dict, meta: dict) -> str:
    """The format-1 checksum (svdcache 0.1.0): tensors as fp32 values and four metadata fields only.
    Read to verify an old file before :func:`svdcache.basis.resave` rewrites it; never written."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(key.encode())
        if t.is_floating_point():
            h.update(t.detach().float().contiguous().cpu().numpy().tobytes())
        else:
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    for key in ("features", "gains", "granularity", "model_class"):
        v = meta.get(key)
        h.update(f"{key}={v if v is None or isinstance(v, str) else json.dumps(v)}".encode())
    return h.hexdigest()[:32]


# -- reading ------------------------------------------------------------------------------------------
def read_metadata(path: str) -> dict | None:
    """The ``__metadata__`` of a safetensors file, read from its header alone (no tensors, no torch);
    None if the file is not a readable safetensors file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 << 20:
                return None
            head = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    meta = head.get("__metadata__") if isinstance(head, dict) else None
    return meta if isinstance(meta, dict) else {}


def _stamp(path: str):
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_safetensors(path: str, attempts: int = 64) -> tuple[dict, dict]:
    """``(metadata, tensors)`` of one version of the file at ``path``. safetensors (0.8) reads the
    header through one open and the tensors through another (torch's from_file, by name), so a file
    replaced in between reads as one file's metadata with another's tensors: read again until the
    path names the same file before and after."""
    from safetensors import safe_open

    for _ in range(attempts):
        before = _stamp(path)
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if _stamp(path) == before:
            return meta, tensors
    raise OSError(f"{path} was replaced {attempts} times while it was read; read it again when it is not being written")


def basis_files_in(folder: str) -> list[str]:
    """The svdcache basis files directly inside ``folder`` (sorted)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    out = []
    for n in names:
        p = os.path.join(folder, n)
        if n.endswith(".safetensors") and os.path.isfile(p) and (read_metadata(p) or {}).get("format") == FORMAT:
            out.append(p)
    return out


def local_basis_file(path) -> str:
    """``path`` as a basis file to read: a FileNotFoundError or IsADirectoryError naming it (and, for a
    folder, the basis file inside it) unless it is a file."""
    p = os.fspath(path)
    if os.path.isdir(p):
        found = basis_files_in(p)
        if len(found) == 1:
            hint = f"load the basis file inside it, {found[0]}"
        elif found:
            hint = f"it holds {len(found)} basis files ({', '.join(os.path.basename(f) for f in found)}): load one of them"
        else:
            hint = "it holds no svdcache basis file: give the path of a .safetensors basis file"
        raise IsADirectoryError(f"{p} is a folder, not a basis file; {hint}")
    if not os.path.exists(p):
        raise FileNotFoundError(f"no basis file at {p}")
    return p


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

    where = os.path.join(subfolder or "", filename)
    try:
        return hf_hub_download(p, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                               token=token, local_files_only=bool(local_files_only))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"svdcache: {p}/{where} is not in the local Hugging Face cache and the Hub cannot be reached "
            "(offline mode or no network): download it once online"
        ) from None
    except (EntryNotFoundError, RepositoryNotFoundError) as e:
        raise FileNotFoundError(f"svdcache: no basis {where!r} in Hub repo {p!r} ({type(e).__name__})") from None


# -- writing ------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e).splitlines() or [type(e).__name__])[0]


def write_atomically(path, write) -> None:
    """``write(tmp)`` into a temporary file of its own beside ``path``, then ``os.replace`` it onto
    ``path``: a reader sees the old file or the whole new one, concurrent writers never share a
    temporary name, and no temporary file is left behind whatever fails. Errors are one-line
    OSErrors naming ``path``."""
    p = os.fspath(path)
    if os.path.isdir(p):
        raise IsADirectoryError(f"cannot save to {p}: it is a directory; give a file name such as "
                                f"{os.path.join(p, FILENAME)}")
    if os.path.lexists(p) and not os.path.isfile(p):  # a device, a pipe, a dangling link: never replaced
        raise FileExistsError(f"cannot save to {p}: it exists and is not a regular file; give another file name")
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise FileNotFoundError(f"cannot save to {p}: the directory {parent} {what}; create it first")
    tmp = None
    for _ in range(100):
        cand = os.path.join(parent, f".{os.path.basename(p)}.{secrets.token_hex(8)}.tmp")
        try:  # O_EXCL: this writer's own name; mode 0o666 so the umask applies as for any new file
            os.close(os.open(cand, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as e:
            raise type(e)(f"cannot save to {p}: cannot write in {parent} ({_one_line(e)})") from None
        tmp = cand
        break
    if tmp is None:
        raise FileExistsError(f"cannot save to {p}: no free temporary name in {parent}")
    try:  # the mode of the file replaced, else of a new file under the umask (safetensors writes 0o600)
        mode = os.stat(p if os.path.isfile(p) else tmp).st_mode & 0o7777
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except OSError as e:
        raise type(e)(f"cannot save to {p}: {_one_line(e)}") from None
    except Exception as e:  # safetensors reports a failed write (disk full, ...) as its own error type
        if type(e).__name__ != "SafetensorError":
            raise
        raise OSError(f"cannot save to {p}: {_one_line(e)}") from None
    finally:
        if os.path.lexists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
