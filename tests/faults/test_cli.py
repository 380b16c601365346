"""``python -m svdcache calibrate``: every bad argument is one line on stderr and exit code 2 before
any model is loaded; a pipeline folder is calibrated at its own call settings."""
import json
import os
import warnings

import pytest

from svdcache.__main__ import main
from svdcache.embedded import CALL_KWARGS, PIPELINE_DIR


class WorkStarted(Exception):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Any model load or calibration raises: validation must come first."""
    import diffusers

    import svdcache.calibration
    import svdcache.embedded

    def boom(*a, **k):
        raise WorkStarted("work started before the arguments were checked")

    monkeypatch.setattr(svdcache.embedded, "load_pipeline", boom)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", boom)
    monkeypatch.setattr(svdcache.calibration, "calibrate", boom)


def _usage_error(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "error:" in err
    for w in words:
        assert w in err, err
    return err


def _cases(tmp_path):
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"x")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    folder = tmp_path / "not_a_pipeline"
    folder.mkdir()
    out = str(tmp_path / "b.safetensors")
    return {
        "tau 0": (["--tau", "0", "--out", out], ("--tau",)),
        "tau 1.5": (["--tau", "1.5", "--out", out], ("--tau",)),
        "tau nan": (["--tau", "nan", "--out", out], ("--tau",)),
        "steps 0": (["--steps", "0", "--out", out], ("--steps",)),
        "calib-steps not ints": (["--calib-steps", "a,b", "--out", out], ("--calib-steps",)),
        "calib-steps past steps": (["--steps", "5", "--calib-steps", "0,7", "--out", out], ("--calib-steps", "7")),
        "calib-steps negative": (["--calib-steps", "-1", "--out", out], ("--calib-steps",)),
        "dtype float33": (["--dtype", "float33", "--out", out], ("--dtype", "float33")),
        "dtype int8": (["--dtype", "int8", "--out", out], ("--dtype",)),
        "dtype not a dtype": (["--dtype", "nn", "--out", out], ("--dtype",)),
        "height 0": (["--height", "0", "--out", out], ("--height",)),
        "width odd": (["--width", "33", "--out", out], ("--width",)),
        "device bogus": (["--device", "gpu7", "--out", out], ("--device",)),
        "out missing dir": (["--out", str(tmp_path / "nope" / "b.safetensors")], ("--out", "does not exist")),
        "out a directory": (["--out", str(tmp_path)], ("--out", "directory")),
        "out not writable": (["--out", str(locked / "b.safetensors")], ("--out", "not writable")),
        "out exists": (["--out", str(existing)], ("--out", "--overwrite")),
        "model missing folder": (["--model", str(tmp_path / "missing"), "--out", out], ("--model",)),
        "model not a pipeline": (["--model", str(folder), "--out", out], ("--model", "model_index.json")),
    }


CASES = ["tau 0", "tau 1.5", "tau nan", "steps 0", "calib-steps not ints", "calib-steps past steps",
         "calib-steps negative", "dtype float33", "dtype int8", "dtype not a dtype", "height 0", "width odd",
         "device bogus", "out missing dir", "out a directory", "out not writable", "out exists",
         "model missing folder", "model not a pipeline"]


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_is_one_line_exit_2_before_any_work(tmp_path, capsys, no_work, case):
    if case == "out not writable" and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    argv, words = _cases(tmp_path)[case]
    _usage_error(capsys, argv, *words)


class _FakeBasis:
    def save(self, path):
        open(path, "wb").write(b"basis")

    def __repr__(self):
        return "Basis(fake)"


@pytest.fixture
def fake_calibrate(monkeypatch):
    import svdcache.calibration

    seen = {}

    def fake(pipe, **kw):
        seen.update(kw, pipe=pipe)
        return _FakeBasis()

    monkeypatch.setattr(svdcache.calibration, "calibrate", fake)
    return seen


def test_overwrite_flag_allows_replacing(tmp_path, capsys, fake_calibrate):
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"old")
    main(["calibrate", "--steps", "2", "--out", str(out), "--overwrite"])
    assert out.read_bytes() == b"basis"


def test_pipeline_folder_is_calibrated_at_its_own_call_settings(tmp_path, capsys, fake_calibrate):
    """--model <the embedded folder> used to calibrate at diffusers' default 128 x 128 (5.5 minutes,
    a basis of the wrong shape): it now uses CALL_KWARGS and says so."""
    out = tmp_path / "b.safetensors"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["calibrate", "--model", PIPELINE_DIR, "--steps", "2", "--out", str(out)])
    for k, v in CALL_KWARGS.items():
        assert fake_calibrate[k] == v
    printed = capsys.readouterr().out
    assert "at 32x32" in printed and "CALL_KWARGS" in printed
    assert not [w for w in caught if "torch_dtype" in str(w.message)]  # dtype=, not the deprecated torch_dtype=


def test_folder_call_defaults_file(tmp_path):
    from svdcache.__main__ import pipeline_call_defaults

    (tmp_path / "svdcache_call.json").write_text(json.dumps({"height": 64, "width": 48}))
    kw, src = pipeline_call_defaults(str(tmp_path))
    assert kw == {"height": 64, "width": 48} and src.endswith("svdcache_call.json")
    assert pipeline_call_defaults(None)[0] == CALL_KWARGS
    (tmp_path / "svdcache_call.json").write_text("[1, 2]")
    from svdcache.__main__ import UsageError

    with pytest.raises(UsageError, match="svdcache_call.json"):
        pipeline_call_defaults(str(tmp_path))


def test_embedded_loader_passes_dtype_not_torch_dtype():
    from svdcache.embedded import load_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline()
    assert not [w for w in caught if "torch_dtype" in str(w.message)]


def test_real_calibration_end_to_end(tmp_path, capsys):
    import svdcache

    out = tmp_path / "b.safetensors"
    main(["calibrate", "--steps", "3", "--out", str(out)])
    assert "at 32x32" in capsys.readouterr().out
    b = svdcache.load_basis(out)
    assert b.meta["model_class"] == "FluxTransformer2DModel" and len(b) == 18


def test_shipped_folder_carries_its_call_settings():
    """A copy of the embedded folder (elsewhere, not matched by path) still calibrates at 32 x 32."""
    import json

    with open(os.path.join(PIPELINE_DIR, "svdcache_call.json")) as f:
        assert json.load(f) == CALL_KWARGS
