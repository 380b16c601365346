"""``python -m svdcache calibrate``: every bad argument is one line on stderr and exit code 2 before
any model is loaded (a missing or incomplete pipeline folder, a misspelt call setting, a device
that is not there, an --out nothing can be written to, a hub id that cannot be fetched); a pipeline
folder is calibrated at its own call settings."""
import json
import os
import warnings

import pytest

from svdcache.__main__ import main
from svdcache.embedded import CALL_KWARGS, PIPELINE_DIR


class WorkStarted(BaseException):  # not an Exception: no error handler of the CLI may swallow it
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Any model load or calibration raises: validation must come first."""
    import diffusers

    import svdcache
    import svdcache.embedded

    def boom(*a, **k):
        raise WorkStarted("work started before the arguments were checked")

    monkeypatch.setattr(svdcache.embedded, "load_pipeline", boom)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", boom)
    monkeypatch.setattr(svdcache, "calibrate", boom)


def _usage_error(capsys, argv, *words, lines=1):
    with pytest.raises(SystemExit) as e:
        main(["calibrate", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == lines, err
    assert err.startswith("python -m svdcache calibrate: error: ")
    for w in words:
        assert w in err, err
    return err


def _pipeline_copy(tmp_path, name="pipe", call=None, index=None):
    """A copy of the embedded pipeline folder (weights linked, not copied), with its call settings
    and model_index.json replaced where given."""
    import shutil

    dst = tmp_path / name
    shutil.copytree(PIPELINE_DIR, dst, copy_function=os.symlink)
    if call is not None:
        os.remove(dst / "svdcache_call.json")
        (dst / "svdcache_call.json").write_text(call if isinstance(call, str) else json.dumps(call))
    if index is not None:
        with open(dst / "model_index.json") as f:
            base = json.load(f)
        os.remove(dst / "model_index.json")
        (dst / "model_index.json").write_text(index if isinstance(index, str) else json.dumps(index(base)))
    return dst


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
        # issue 29
        "device meta": (["--device", "meta", "--out", out], ("--device", "meta", "cpu")),
        "device mps": (["--device", "mps", "--out", out], ("--device", "mps")),
        "device cuda:7": (["--device", "cuda:7", "--out", out], ("--device cuda:7",)),
        "out under /proc": (["--out", "/proc/b.safetensors"], ("--out", "/proc", "cannot write")),
        "out under /sys": (["--out", "/sys/b.safetensors"], ("--out", "/sys")),
        "out under a file": (["--out", str(existing / "b.safetensors")], ("--out", "is a file")),
        "out a device": (["--out", "/dev/null", "--overwrite"], ("--out", "not a regular file")),
        "seed too big": (["--seed", str(2**64), "--out", out], ("--seed",)),
        "model relative missing": (["--model", "./no_such_pipeline", "--out", out], ("--model", "no such folder")),
        "model trailing slash": (["--model", "owner/name/", "--out", out], ("--model", "no such folder")),
        "model a file": (["--model", str(existing), "--out", out], ("--model", "is a file")),
    }


CASES = ["tau 0", "tau 1.5", "tau nan", "steps 0", "calib-steps not ints", "calib-steps past steps",
         "calib-steps negative", "dtype float33", "dtype int8", "dtype not a dtype", "height 0", "width odd",
         "device bogus", "out missing dir", "out a directory", "out not writable", "out exists",
         "model missing folder", "model not a pipeline",
         "device meta", "device mps", "device cuda:7", "out under /proc", "out under /sys", "out under a file",
         "out a device", "seed too big", "model relative missing", "model trailing slash", "model a file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_is_one_line_exit_2_before_any_work(tmp_path, capsys, no_work, case):
    if case == "out not writable" and os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    if case.startswith("out under /") and not os.path.isdir(case.split()[-1]):
        pytest.skip(f"no {case.split()[-1]} here")
    argv, words = _cases(tmp_path)[case]
    _usage_error(capsys, argv, *words)


class _FakeBasis:
    def save(self, path):
        open(path, "wb").write(b"basis")

    def __repr__(self):
        return "Basis(fake)"


@pytest.fixture
def fake_calibrate(monkeypatch):
    import svdcache

    seen = {}

    def fake(pipe, **kw):
        seen.update(kw, pipe=pipe)
        return _FakeBasis()

    monkeypatch.setattr(svdcache, "calibrate", fake)
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


# -- pipeline folders, checked before loading (issue 29) ------------------------------------------
def _no_transformer(m):
    m.pop("transformer")
    return m


def _two_transformers(m):
    m["transformer_2"] = m["transformer"]
    return m


FOLDER_CASES = {
    "model_index not JSON": (dict(index='{"_class_name": '), ("model_index.json", "not valid JSON")),
    "model_index a list": (dict(index="[1, 2]"), ("model_index.json", "_class_name")),
    "no _class_name": (dict(index=lambda m: {k: v for k, v in m.items() if k != "_class_name"}), ("_class_name",)),
    "_class_name not a pipeline": (dict(index=lambda m: dict(m, _class_name="FluxTransformer2DModel")),
                                   ("FluxTransformer2DModel", "not a pipeline class")),
    "_class_name unknown": (dict(index=lambda m: dict(m, _class_name="FluxPipelin")), ("FluxPipelin",)),
    "component entry malformed": (dict(index=lambda m: dict(m, vae="AutoencoderKL")), ("'vae'",)),
    "component folder missing": (dict(index=lambda m: dict(m, controlnet=["diffusers", "FluxControlNetModel"])),
                                 ("'controlnet'", "missing")),
    "no transformer": (dict(index=_no_transformer), ("no transformer",)),
    "two transformers": (dict(index=_two_transformers), ("transformer_2",)),
    "call key misspelt": (dict(call={"heigth": 32, "width": 32}), ("svdcache_call.json", "'heigth'", "'height'")),
    "call key unknown": (dict(call={"height": 32, "colour": "red"}), ("'colour'", "FluxPipeline.__call__")),
    "call sets the prompt": (dict(call={"prompt": "x"}), ("'prompt'", "--prompt")),
    "call sets the step count": (dict(call={"num_inference_steps": 3}), ("num_inference_steps", "--steps")),
    "call not JSON": (dict(call="{height: 32"), ("svdcache_call.json", "JSON")),
    "call height not a multiple of 16": (dict(call={"height": 33}), ("'height'", "16")),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_bad_pipeline_folder_is_one_line_before_loading(tmp_path, capsys, no_work, case):
    kw, words = FOLDER_CASES[case]
    folder = _pipeline_copy(tmp_path, **kw)
    _usage_error(capsys, ["--model", str(folder), "--out", str(tmp_path / "b.safetensors")], *words)


def test_lone_model_index(tmp_path, capsys, no_work):
    """A folder holding nothing but model_index.json (the components' folders missing)."""
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model_index.json").write_text(open(os.path.join(PIPELINE_DIR, "model_index.json")).read())
    _usage_error(capsys, ["--model", str(lone), "--out", str(tmp_path / "b.safetensors")], "component", "missing")


def test_a_good_folder_copy_passes_every_check(tmp_path, no_work):
    folder = _pipeline_copy(tmp_path)
    with pytest.raises(WorkStarted):
        main(["calibrate", "--model", str(folder), "--out", str(tmp_path / "b.safetensors")])


def test_out_probe_leaves_nothing_behind(tmp_path, no_work):
    with pytest.raises(WorkStarted):
        main(["calibrate", "--out", str(tmp_path / "b.safetensors")])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", ["offline", "http"])
def test_hub_id_that_cannot_be_fetched_is_one_line(tmp_path, capsys, monkeypatch, error):
    """A hub id without network was a 60-line diffusers traceback."""
    import diffusers

    def fetch(*a, **k):
        if error == "offline":
            raise OSError("Cannot load model owner/name: the model is not fully cached locally and an error\n"
                          "occurred while trying to fetch metadata from the Hub.")
        from huggingface_hub.errors import HfHubHTTPError

        raise HfHubHTTPError("503 Server Error: Service Unavailable for url: https://huggingface.co/api/models/owner/name")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", fetch)
    _usage_error(capsys, ["--model", "owner/name", "--out", str(tmp_path / "b.safetensors")],
                 "--model owner/name", "could not be fetched", "local pipeline folder", "connect")


def test_hub_id_offline_subprocess(tmp_path):
    """The real thing, in a process of its own: HF_HUB_OFFLINE=1 and an empty cache."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = subprocess.run([sys.executable, "-m", "svdcache", "calibrate", "--model", "owner/name", "--out",
                        str(tmp_path / "b.safetensors")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "could not be fetched" in err[0], r.stderr
    assert not (tmp_path / "b.safetensors").exists()


def test_calibrate_output_has_no_foreign_warnings(tmp_path):
    """The CLI printed transformers' torchvision notices, diffusers' accelerate advice and loading
    bars: now only its own lines (the reference generation's bar, labelled, and the SVD's)."""
    import subprocess
    import sys

    out = tmp_path / "b.safetensors"
    r = subprocess.run([sys.executable, "-m", "svdcache", "calibrate", "--steps", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for foreign in ("accelerate", "torchvision", "[transformers]", "Loading pipeline components", "Loading weights",
                    "Warning", "warn"):
        assert foreign not in r.stderr, (foreign, r.stderr[-2000:])
    assert "svdcache calibrate: reference generation" in r.stderr
    assert out.exists()


def test_the_two_svd_progress_bars_have_distinct_labels(tmp_path, capsys):
    import re

    main(["calibrate", "--steps", "2", "--out", str(tmp_path / "b.safetensors")])
    err = capsys.readouterr().err.replace("\r", "\n")
    bars = re.findall(r"^([^\n]*one-time SVD[^\n]*?):\s+\d+%", err, re.M)
    assert bars, err[-2000:]  # the bars are there: only their labels are judged
    assert len(set(bars)) == 2, set(bars)
