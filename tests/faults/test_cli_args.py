"""The command line's arguments (svdcache/cli_args.py): ``--help`` and every argument error answer
without importing torch or diffusers; an argument error is one line (``prog: error: ...``) and at
most one hint, exit code 2, never argparse's usage block or a traceback (fuzzed)."""
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import svdcache
from svdcache import cli_args
from svdcache.__main__ import main

PKG_DIR = os.path.dirname(os.path.abspath(svdcache.__file__))
HEAVY = ("torch", "diffusers", "transformers", "huggingface_hub", "triton")

# Runs ``python -m svdcache ARGS`` in this process's interpreter and reports the exit code and which
# heavy modules were imported by then. STUB replaces the package's __init__ by an empty package, so
# the command line's own modules are judged apart from what svdcache/__init__.py imports.
_PROBE = """
import importlib.machinery, json, runpy, sys, types
if {stub}:
    pkg = types.ModuleType("svdcache")
    pkg.__path__ = [{pkg_dir!r}]
    pkg.__spec__ = importlib.machinery.ModuleSpec("svdcache", None, is_package=True)
    pkg.__spec__.submodule_search_locations = pkg.__path__
    sys.modules["svdcache"] = pkg
sys.argv = ["svdcache", *{argv!r}]
code = None
try:
    runpy.run_module("svdcache", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
sys.stdout.flush()
print("\\nPROBE " + json.dumps({{"code": code, "heavy": sorted(m for m in {heavy!r} if m in sys.modules)}}))
"""


def _probe(argv, stub, cwd):
    code = _PROBE.format(stub=stub, pkg_dir=PKG_DIR, argv=list(argv), heavy=HEAVY)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(PKG_DIR), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, (r.stdout[-2000:], r.stderr[-2000:])
    return json.loads(line[-1][6:]), r.stderr


def _argument_cases(tmp):
    a_file = os.path.join(tmp, "a_file")
    open(a_file, "w").close()
    out = os.path.join(tmp, "b.safetensors")
    return [
        (["--help"], 0), (["demo", "--help"], 0), (["calibrate", "--help"], 0),
        ([], 2), (["bogus"], 2), (["--bogus"], 2),
        (["demo", "--cfg", "x"], 2), (["demo", "--cfg", "nan"], 2), (["demo", "--cfg", "inf"], 2),
        (["demo", "--threads", "100000"], 2), (["demo", "--device", "gpu7"], 2), (["demo", "--device", "meta"], 2),
        (["demo", "--interval", "0"], 2), (["demo", "--predictor", "bogus"], 2), (["demo", "--bogus"], 2),
        (["demo", "--out", os.path.join(a_file, "x.png")], 2), (["demo", "--out", "x.txt"], 2),
        (["demo", "--basis", os.path.join(tmp, "missing.safetensors")], 2), (["demo", "--basis", tmp], 2),
        (["calibrate"], 2), (["calibrate", "--tau", "2", "--out", out], 2),
        (["calibrate", "--device", "meta", "--out", out], 2), (["calibrate", "--device", "mps", "--out", out], 2),
        (["calibrate", "--model", os.path.join(tmp, "missing"), "--out", out], 2),
        (["calibrate", "--model", tmp, "--out", out], 2),  # a folder without model_index.json
        (["calibrate", "--out", "/proc/b.safetensors"], 2), (["calibrate", "--dtype", "float33", "--out", out], 2),
        (["calibrate", "--steps", "x", "--out", out], 2),
    ]


def _check_answers(tmp_path, stub):
    for argv, want in _argument_cases(str(tmp_path)):
        got, err = _probe(argv, stub, cwd=str(tmp_path))
        assert got["code"] == want, (argv, got, err)
        assert got["heavy"] == [], (argv, got["heavy"])
        if want == 2:
            lines = err.strip().splitlines()
            assert 1 <= len(lines) <= 2 and ": error: " in lines[0], (argv, err)


def test_help_and_argument_errors_import_no_torch(tmp_path):
    """The command line's modules alone (__main__, cli_args, basis_io): before, building the parser
    imported the demo, which imported torch and diffusers (5.7 s for --help)."""
    _check_answers(tmp_path, stub=True)


def test_python_m_svdcache_help_imports_no_torch(tmp_path):
    _check_answers(tmp_path, stub=False)


# -- one line, at most one hint -------------------------------------------------------------------
ARGPARSE_ERRORS = [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["demo", "--steps"], "expected one argument"),
    (["demo", "--steps", "ten"], "invalid int value"),
    (["demo", "--residual", "int3"], "invalid choice"),
    (["demo", "--nope"], "unrecognized arguments"),
    (["calibrate"], "--out"),
    (["calibrate", "--out", "b.safetensors", "--granularity", "layer"], "invalid choice"),
    (["calibrate", "--out", "b.safetensors", "--tau", "high"], "invalid float value"),
]


@pytest.mark.parametrize("argv,words", ARGPARSE_ERRORS)
def test_argparse_errors_are_one_line_and_a_hint(argv, words, capsys):
    """argparse printed an 8-line usage block before its error."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("python -m svdcache") and ": error: " in err[0] and words in err[0], err
    assert err[1].startswith("see python -m svdcache") and err[1].endswith("--help"), err
    assert not any(line.startswith("usage:") for line in err)


def test_demo_main_uses_the_same_parser(capsys):
    from svdcache import demo

    with pytest.raises(SystemExit) as e:
        demo.main(["--cfg", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("python -m svdcache demo: error: argument --cfg"), err


def test_cli_defaults_match_the_runtime():
    """cli_args holds the demo's defaults and choices without importing torch: they must be the
    runtime's (SVDCacheConfig, the embedded pipeline's guidance)."""
    from svdcache.embedded import GUIDANCE

    cfg = svdcache.SVDCacheConfig()
    assert (cli_args.DEFAULT_INTERVAL, cli_args.DEFAULT_PREDICTOR, cli_args.DEFAULT_RESIDUAL) == (
        cfg.interval, cfg.predictor, cfg.residual)
    assert cli_args.GUIDANCE_SCALE == GUIDANCE["true_cfg_scale"]
    def checked(**kw):  # refused at construction or at validate(), whichever the config does
        c = svdcache.SVDCacheConfig(**kw)
        getattr(c, "validate", lambda: None)()
        return c

    for p in cli_args.PREDICTORS:
        checked(predictor=p)
    for r in cli_args.RESIDUALS:
        checked(residual=r)
    for field in ("predictor", "residual"):
        with pytest.raises((ValueError, TypeError)):
            checked(**{field: "bogus"})
    import torch

    for name in cli_args.FLOAT_DTYPES:
        assert getattr(torch, name).is_floating_point


# -- fuzz: any argument list ends in help, one line (exit 2), or the work ---------------------------
class WorkStarted(BaseException):
    pass


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_fuzz")
    (d / "a_file").write_text("x")
    (d / "text.safetensors").write_text("not a basis")
    (d / "folder").mkdir()
    return d


def _values(d):
    paths = [str(d / "ok.png"), str(d / "b.safetensors"), str(d / "a_file" / "x.png"), str(d / "a_file"),
             str(d / "folder"), str(d / "text.safetensors"), "/proc/x.png", "/dev/null", str(d / "no" / "x.png")]
    return st.one_of(
        st.sampled_from(["0", "-1", "1", "2", "3", "16", "33", "100000", "nan", "inf", "-inf", "1e309", "0.5", "x", "",
                         "cpu", "cuda", "cuda:7", "meta", "mps", "gpu7", "online", "float32", "int8", "owner/name",
                         "0,1", "a,b", "5,5", "taylor", "int4", "block"]),
        st.sampled_from(paths),
        st.text(max_size=6),
    )


DEMO_FLAGS = ["--interval", "--predictor", "--residual", "--steps", "--seeds", "--cfg", "--repeats", "--device",
              "--basis", "--out", "--threads", "--bogus"]
CAL_FLAGS = ["--model", "--prompt", "--steps", "--calib-steps", "--tau", "--granularity", "--height", "--width",
             "--device", "--dtype", "--seed", "--out", "--overwrite", "--bogus"]


@pytest.fixture
def no_work(monkeypatch):
    import svdcache.__main__ as cli
    import svdcache.embedded

    def boom(*a, **k):
        raise WorkStarted

    monkeypatch.setattr(svdcache.embedded, "load_pipeline", boom)
    monkeypatch.setattr(cli, "_calibrate", boom)


FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.data(), cmd=st.sampled_from(["demo", "calibrate"]))
def test_fuzz_arguments(fuzz_dir, no_work, capsys, data, cmd):
    flags = DEMO_FLAGS if cmd == "demo" else CAL_FLAGS
    argv = [cmd]
    for _ in range(data.draw(st.integers(0, 5))):
        flag = data.draw(st.sampled_from(flags))
        argv.append(flag)
        if flag != "--overwrite" and data.draw(st.integers(0, 9)) > 0:  # now and then a flag without its value
            argv.append(data.draw(_values(fuzz_dir)))
    if cmd == "calibrate" and data.draw(st.booleans()):
        argv += ["--out", str(fuzz_dir / "b.safetensors")]
    capsys.readouterr()
    try:
        main(argv)
    except WorkStarted:
        event("work started")
        return
    except SystemExit as e:
        err = capsys.readouterr().err.strip().splitlines()
        if e.code == 0:
            event("help")
            return
        assert e.code == 2, (argv, e.code, err)
        assert 1 <= len(err) <= 2 and err[0].startswith(f"python -m svdcache {cmd}: error: "), (argv, err)
        event("refused")
        return
    pytest.fail(f"{argv}: main returned without the work")
