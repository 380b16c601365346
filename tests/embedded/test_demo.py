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
