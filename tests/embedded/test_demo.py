"""README command 1's demo, at a few steps: it runs, prints its table and writes the PNG; every bad
argument ends in one line (exit 2) before the first generation."""
import os

import pytest

from svdcache import demo
from svdcache.embedded import BASIS_PATH, PIPELINE_DIR


def test_demo_writes_png_and_table(tmp_path, capsys):
    out = tmp_path / "demo.png"
    demo.main(["--steps", "8", "--seeds", "1", "--repeats", "1", "--interval", "3", "--out", str(out)])
    text = capsys.readouterr().out
    for key in ("speed-up", "FLOPs ratio", "PSNR vs uncached", "SSIM vs uncached", "cache memory"):
        assert key in text
    assert "nan" not in text.lower()
    from PIL import Image

    img = Image.open(out)
    assert img.size == (10 * 32 * 4, 3 * 32 * 4)  # ten digits; uncached / cached / difference rows
    assert os.path.getsize(out) > 1000


def _one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m svdcache demo: error: "), err
    assert all(w in err[0] for w in words), err
    return err[0]


@pytest.mark.parametrize("argv,words", [
    (["--out", "out/demo"], ["--out", "not an image file name"]),
    (["--out", "."], ["--out", "is a directory"]),
    (["--steps", "0"], ["--steps", ">= 1"]),
    (["--cfg", "0.5"], ["--cfg", "1 to 100"]),
    (["--basis", "missing.safetensors"], ["--basis", "no such file"]),
    # issue 29: --cfg inf exited 0 with a NaN table; --threads 100000 segfaulted
    (["--cfg", "inf"], ["--cfg", "inf"]),
    (["--cfg", "nan"], ["--cfg", "nan"]),
    (["--cfg", "1e6"], ["--cfg"]),
    (["--threads", "100000"], ["--threads", "100000"]),
    (["--threads", "-1"], ["--threads"]),
    (["--device", "gpu7"], ["--device", "gpu7", "cpu"]),
    (["--device", "meta"], ["--device", "meta"]),
    (["--device", "mps"], ["--device", "mps"]),
    (["--basis", PIPELINE_DIR], ["--basis", "folder", BASIS_PATH]),
    (["--out", "/proc/demo.png"], ["--out", "/proc"]),
])
def test_bad_arguments_end_in_one_line_before_any_work(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_demo", lambda args: pytest.fail("generation started"))
    if "/proc/demo.png" in argv and not os.path.isdir("/proc"):
        pytest.skip("no /proc here")
    _one_line(capsys, argv, words)


def test_out_under_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_demo", lambda args: pytest.fail("generation started"))
    f = tmp_path / "file"
    f.write_text("x")
    _one_line(capsys, ["--out", str(f / "sub" / "demo.png")], ["--out", str(f), "is a file"])


class Generating(BaseException):
    pass


@pytest.fixture
def no_generation(monkeypatch):
    def stop(*a, **k):
        raise Generating

    monkeypatch.setattr(demo, "_generate", stop)


def _basis_files(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("not a basis")
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    wan = os.path.join(os.path.dirname(PIPELINE_DIR), "tiny-wan-digits", "svdcache_basis.safetensors")
    return {
        "text file": (str(text), ["not a readable svdcache basis"]),
        "other safetensors": (str(tmp_path / "weights.safetensors"), ["not an svdcache basis"]),
        "another model's basis": (wan, ["WanTransformer3DModel", "FluxTransformer2DModel"]),
    }


@pytest.mark.parametrize("case", ["text file", "other safetensors", "another model's basis"])
def test_bad_basis_is_refused_before_the_generations(tmp_path, capsys, no_generation, case):
    """--basis was checked for existence only: a file of another model failed after the minutes of
    generation. It is now loaded and validated against the embedded model first."""
    path, words = _basis_files(tmp_path)[case]
    msg = _one_line(capsys, ["--basis", path, "--steps", "2", "--seeds", "1", "--repeats", "1",
                             "--out", str(tmp_path / "d.png")], words)
    assert path in msg


@pytest.mark.parametrize("basis", [None, BASIS_PATH, "online"])
def test_good_basis_reaches_the_generations(tmp_path, no_generation, basis):
    argv = ["--steps", "2", "--seeds", "1", "--repeats", "1", "--out", str(tmp_path / "d.png")]
    with pytest.raises(Generating):
        demo.main(argv + (["--basis", basis] if basis else []))


def test_cuda_that_is_not_there(tmp_path, capsys, no_generation):
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    _one_line(capsys, ["--device", "cuda:7", "--out", str(tmp_path / "d.png")], ["--device cuda:7"])
