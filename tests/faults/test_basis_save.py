"""Basis.save: errors are one line naming the path, no temporary file is ever left behind, and
concurrent saves to one path (threads and processes) all succeed while readers only ever see a
whole file."""
import os
import threading
import time

import pytest
import torch

import svdcache
from svdcache.basis import Basis, FeatureBasis


def _basis(seed=0, D=32, k=4):
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for name in ("blocks.0.attn", "blocks.0.ff", "blocks.1.ff"):
        V, _ = torch.linalg.qr(torch.randn(D, 2 * k, generator=g))
        feats[name] = FeatureBasis(V=V, sigma=torch.linspace(3.0, 1.0, 2 * k), k=k)
    return Basis(features=feats, meta={"model_class": "TinyModel", "tau": 0.9, "seed": seed})


def _one_line_naming(e, path):
    msg = str(e)
    assert "\n" not in msg and str(path) in msg and msg.startswith("cannot save to"), msg
    return msg


def _listing(d):
    return sorted(os.listdir(d))


def test_save_onto_a_directory(tmp_path):
    target = tmp_path / "a_dir"
    target.mkdir()
    before = _listing(tmp_path)
    with pytest.raises(IsADirectoryError) as e:
        _basis().save(target)
    assert "directory" in _one_line_naming(e.value, target)
    assert _listing(tmp_path) == before and _listing(target) == []  # no <path>.tmp left behind


def test_save_into_a_missing_directory(tmp_path):
    path = tmp_path / "missing" / "b.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        _basis().save(path)
    assert "does not exist" in _one_line_naming(e.value, path)


def test_save_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    path = f / "b.safetensors"
    with pytest.raises(OSError) as e:
        _basis().save(path)
    assert "not a directory" in _one_line_naming(e.value, path)


@pytest.mark.parametrize("path", ["/proc/svdcache_basis.safetensors", "/sys/svdcache_basis.safetensors"])
def test_save_where_nothing_can_be_written(path):
    if not os.path.isdir(os.path.dirname(path)):
        pytest.skip(f"no {os.path.dirname(path)} here")
    with pytest.raises(OSError) as e:
        _basis().save(path)
    _one_line_naming(e.value, path)
    assert not os.path.exists(path)


def test_save_onto_a_device_or_a_dangling_link(tmp_path):
    """os.replace would put the basis where /dev/null was (as root); a dangling link likewise."""
    with pytest.raises(FileExistsError) as e:
        _basis().save("/dev/null")
    assert "not a regular file" in _one_line_naming(e.value, "/dev/null")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    link = tmp_path / "link.safetensors"
    os.symlink(tmp_path / "nowhere", link)
    with pytest.raises(FileExistsError):
        _basis().save(link)
    assert _listing(tmp_path) == ["link.safetensors"]


def test_save_into_a_read_only_directory(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    d = tmp_path / "ro"
    d.mkdir()
    os.chmod(d, 0o500)
    try:
        with pytest.raises(PermissionError) as e:
            _basis().save(d / "b.safetensors")
        assert "cannot write in" in _one_line_naming(e.value, d / "b.safetensors")
        assert _listing(d) == []
    finally:
        os.chmod(d, 0o700)


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    path = tmp_path / "b.safetensors"
    with pytest.raises(OSError) as e:
        _basis().save(path)
    assert "No space left" in _one_line_naming(e.value, path)
    assert _listing(tmp_path) == []


def test_saved_file_mode_follows_the_umask(tmp_path):
    """safetensors writes 0o600 files; a saved basis is created like any other file (umask), and a
    replaced one keeps its mode."""
    path = tmp_path / "b.safetensors"
    old = os.umask(0o022)
    try:
        _basis().save(path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    os.chmod(path, 0o640)
    _basis(1).save(path)
    assert os.stat(path).st_mode & 0o777 == 0o640


def _check_whole(path, seeds):
    b = svdcache.load_basis(path)  # any partial file would fail its checksum or its header
    assert int(b.meta["seed"]) in seeds


def test_concurrent_saves_threads(tmp_path):
    """Before: every save wrote <path>.tmp, and concurrent saves collided on it (8 of 600 failed)."""
    path = tmp_path / "b.safetensors"
    bases = [_basis(s) for s in range(6)]
    bases[0].save(path)
    errors, stop = [], threading.Event()

    def writer(b):
        try:
            for _ in range(15):
                b.save(path)
        except Exception as e:  # noqa: BLE001  (collected and reported)
            errors.append(e)

    def reader():
        while not stop.is_set():
            try:
                _check_whole(path, range(6))
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(b,)) for b in bases]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    assert _listing(tmp_path) == ["b.safetensors"]
    _check_whole(path, range(6))


_CHILD = """
import os, sys, time
sys.path.insert(0, {here!r})
from test_basis_save import _basis
path, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
b = _basis(seed)
open(path + f".ready{{seed}}", "w").close()
while not os.path.exists(path + ".go"):  # all writers start together, after their imports
    time.sleep(0.001)
for _ in range(n):
    b.save(path)
"""


def test_concurrent_saves_processes(tmp_path):
    """Processes (no shared memory, no GIL) saving to one path at once while this one reads it."""
    import subprocess
    import sys

    path = str(tmp_path / "b.safetensors")
    _basis(0).save(path)
    code = _CHILD.format(here=os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", code, path, str(s), "60"], stderr=subprocess.PIPE, text=True)
             for s in range(3)]
    deadline = time.monotonic() + 300
    while not all(os.path.exists(f"{path}.ready{s}") for s in range(3)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.stderr.read() for p in procs if p.poll() is not None]
        time.sleep(0.05)
    for s in range(3):
        os.remove(f"{path}.ready{s}")
    open(f"{path}.go", "w").close()
    reads = 0
    while any(p.poll() is None for p in procs):
        _check_whole(path, range(3))
        reads += 1
    errs = [p.stderr.read() for p in procs]
    assert [p.returncode for p in procs] == [0] * 3, errs
    os.remove(f"{path}.go")
    assert reads > 0 and _listing(tmp_path) == ["b.safetensors"]
    _check_whole(path, range(3))
