"""README command 1's demo, at a few steps: it runs, prints its table and writes the PNG."""
import os

from svdcache import demo


def test_demo_writes_png_and_table(tmp_path, capsys):
    out = tmp_path / "demo.png"
    demo.main(["--steps", "8", "--seeds", "1", "--repeats", "1", "--interval", "3", "--out", str(out)])
    text = capsys.readouterr().out
    for key in ("speed-up", "FLOPs ratio", "PSNR vs uncached", "SSIM vs uncached", "cache memory"):
        assert key in text
    from PIL import Image

    img = Image.open(out)
    assert img.size == (10 * 32 * 4, 3 * 32 * 4)  # ten digits; uncached / cached / difference rows
    assert os.path.getsize(out) > 1000


import pytest  # noqa: E402


@pytest.mark.parametrize("argv,words", [
    (["--out", "out/demo"], ["--out", "not an image file name"]),
    (["--out", "."], ["--out", "is a directory"]),
    (["--steps", "0"], ["--steps", ">= 1"]),
    (["--cfg", "0.5"], ["--cfg", ">= 1"]),
    (["--basis", "missing.safetensors"], ["--basis", "no such file"]),
])
def test_bad_arguments_end_in_one_line_before_any_work(argv, words, capsys, monkeypatch):
    monkeypatch.setattr(demo, "run_demo", lambda args: pytest.fail("generation started"))
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(w in err for w in words), err
