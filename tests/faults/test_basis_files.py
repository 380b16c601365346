"""Damaged, edited and hand-made basis files: each is refused with a ValueError naming the file and
the field, or it loads and gives an image as close to the uncached one as the untouched basis."""
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import svdcache
from svdcache.basis import Basis, FeatureBasis
from svdcache.basis_io import checksum

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEAT = "transformer_blocks.1.ff"  # a feature with k well inside its stored columns


def read_raw(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def write_raw(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def refused(path, *fields):
    """load_basis raises one ValueError that names the file and every word of ``fields``."""
    with pytest.raises(ValueError) as e:
        svdcache.load_basis(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    for f in fields:
        assert f in msg, msg
    return msg


def edited(tmp_path, good_file, *, keep_checksum=False, resign=False, tensors=None, meta=None, name="bad.safetensors"):
    """The good file with some tensors / metadata fields replaced (None deletes a field); its checksum
    removed, kept as it was (``keep_checksum``: the edit is after saving), or recomputed over the
    edited content (``resign``: a tool that writes valid files made it)."""
    t, m = read_raw(good_file)
    if not keep_checksum:
        m.pop("checksum", None)
    for k, v in (tensors or {}).items():
        t[k] = v
    for k, v in (meta or {}).items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    if resign:
        m["checksum"] = checksum(t, m)
    return write_raw(tmp_path / name, t, m)


def _features_meta(good_file, fn):
    m = json.loads(read_raw(good_file)[1]["features"])
    fn(m)
    return json.dumps(m)


# -- save and reuse ----------------------------------------------------------------------------
def test_zero_setup_basis_saves_and_loads(emb, tmp_path):
    """The README's save-and-reuse path for the online basis (its change subspace IS its feature
    subspace: V and dV are one tensor, which safetensors refused to write)."""
    svdcache.enable(emb.pipe, interval=2, warmup=3)
    try:
        emb.gen()
        b = svdcache.current_basis(emb.pipe)
        assert b is not None and b.changes
        path = tmp_path / "online.safetensors"
        b.save(path)
        a = emb.gen()
    finally:
        svdcache.disable(emb.pipe)
    loaded = svdcache.load_basis(path)
    for n, fb in b.features.items():
        assert torch.equal(loaded.features[n].V, fb.V) and torch.equal(loaded.changes[n].V, b.changes[n].V)
    svdcache.enable(emb.pipe, basis=loaded, interval=2, warmup=3)
    try:
        assert torch.equal(emb.gen(), a)  # the saved basis is the one the online run used
    finally:
        svdcache.disable(emb.pipe)


def test_unknown_metadata_is_passed_through(tmp_path, good_file):
    path = edited(tmp_path, good_file, resign=True, meta={"my_tool": '{"N5": [0, 1, 2]}', "note": "x"})
    b = svdcache.load_basis(path)
    assert b.meta["my_tool"] == '{"N5": [0, 1, 2]}' and b.meta["note"] == "x"
    b.save(tmp_path / "again.safetensors")
    assert svdcache.load_basis(tmp_path / "again.safetensors").meta["my_tool"] == '{"N5": [0, 1, 2]}'


# -- refused tensors ---------------------------------------------------------------------------
def _tensor_cases(t):
    dV, V, sig, dsig = t[f"{FEAT}::dV"], t[f"{FEAT}::V"], t[f"{FEAT}::sigma"], t[f"{FEAT}::dsigma"]
    g = torch.Generator().manual_seed(0)
    nan_sig = sig.clone()
    nan_sig[3] = float("nan")
    inf_dsig = dsig.clone()
    inf_dsig[0] = float("inf")
    up = sig.clone()
    up[2] = up[0] * 2
    neg = dsig.clone()
    neg[1] = -1.0
    return {
        "change subspace x10": ({f"{FEAT}::dV": dV * 10}, ("dV", "orthonormal")),
        "random change subspace": ({f"{FEAT}::dV": torch.randn(dV.shape, generator=g)}, ("dV", "orthonormal")),
        "random feature subspace": ({f"{FEAT}::V": torch.rand(V.shape, generator=g)}, (": V ", "orthonormal")),
        "V slightly rotated off": ({f"{FEAT}::V": V + 0.01 * torch.randn(V.shape, generator=g)}, ("orthonormal",)),
        "V as int32": ({f"{FEAT}::V": (V * 100).to(torch.int32)}, ("int32", "float")),
        "V with NaN": ({f"{FEAT}::V": torch.where(V > 0.2, float("nan"), V)}, ("non-finite",)),
        "sigma NaN": ({f"{FEAT}::sigma": nan_sig}, ("sigma",)),
        "dsigma Inf": ({f"{FEAT}::dsigma": inf_dsig}, ("dsigma",)),
        "sigma increasing": ({f"{FEAT}::sigma": up}, ("sigma", "non-increasing")),
        "dsigma negative": ({f"{FEAT}::dsigma": neg}, ("dsigma", "negative")),
        "sigma too short": ({f"{FEAT}::sigma": sig[:2]}, ("sigma", "values for")),
        "sigma 2-D": ({f"{FEAT}::sigma": sig[None]}, ("sigma", "1-D")),
        "V 1-D": ({f"{FEAT}::V": V[:, 0]}, ("2-D",)),
    }


TENSOR_CASES = ["change subspace x10", "random change subspace", "random feature subspace", "V slightly rotated off",
                "V as int32", "V with NaN", "sigma NaN", "dsigma Inf", "sigma increasing", "dsigma negative",
                "sigma too short", "sigma 2-D", "V 1-D"]


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_damaged_tensors_are_refused(tmp_path, good_file, case):
    t, _ = read_raw(good_file)
    tensors, fields = _tensor_cases(t)[case]
    refused(edited(tmp_path, good_file, tensors=tensors), FEAT, *fields)


def test_zero_columns_refused_at_load_and_at_enable(tmp_path, good_file, emb):
    t, _ = read_raw(good_file)
    path = edited(tmp_path, good_file, tensors={f"{FEAT}::V": t[f"{FEAT}::V"][:, :0]},
                  meta={"features": _features_meta(good_file, lambda m: m[FEAT].pop("stored_rank"))})
    refused(path, FEAT, "0 columns")
    b = svdcache.load_basis(good_file)
    b.features[FEAT].V = b.features[FEAT].V[:, :0]
    with pytest.raises(ValueError, match=rf"{FEAT}.*0 columns"):
        svdcache.enable(emb.pipe, basis=b, subspace="feature")
    assert not svdcache.is_enabled(emb.pipe)


def test_in_memory_basis_is_checked_at_enable(good_file, emb):
    b = svdcache.load_basis(good_file)
    b.changes[FEAT].V = b.changes[FEAT].V * 10
    with pytest.raises(ValueError, match=rf"{FEAT}.*orthonormal"):
        svdcache.enable(emb.pipe, basis=b)
    assert not svdcache.is_enabled(emb.pipe)


# -- refused metadata --------------------------------------------------------------------------
def _set(key, value):
    def fn(m):
        m[FEAT][key] = value
    return fn


META_CASES = {
    "features bad JSON": ({"features": '{"a": '}, ("'features'", "JSON")),
    "features missing": ({"features": None}, ("'features'", "missing")),
    "features a list": ({"features": "[1, 2]"}, ("'features'", "list")),
    "features empty": ({"features": "{}"}, ("'features'",)),
    "gains bad JSON": ({"gains": "{not json"}, ("'gains'", "JSON")),
    "gains a list": ({"gains": "[1.0]"}, ("'gains'", "list")),
    "gains 1e6": ({"gains": json.dumps({FEAT: {"change/o1_N5_w3": 1e6}})}, ("'gains'", FEAT, "[0, 2]")),
    "gains NaN": ({"gains": '{"%s": {"o1_N5_w3": NaN}}' % FEAT}, ("'gains'", FEAT)),
    "gains negative": ({"gains": json.dumps({FEAT: {"o1_N5_w3": -0.5}})}, ("'gains'",)),
    "gains a string": ({"gains": json.dumps({FEAT: {"o1_N5_w3": "1.0"}})}, ("'gains'",)),
    "gains table a list": ({"gains": json.dumps({FEAT: [1.0]})}, ("'gains'", FEAT)),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_damaged_metadata_is_refused(tmp_path, good_file, case):
    meta, fields = META_CASES[case]
    refused(edited(tmp_path, good_file, meta=meta), *fields)


FEATURE_FIELD_CASES = {
    "k not an int": (_set("k", "five"), ("'k'", "integer")),
    "k a float": (_set("k", 2.5), ("'k'",)),
    "k zero": (_set("k", 0), ("'k'",)),
    "k past the stored columns": (_set("k", 999), ("k", "999")),
    "dk past the stored columns": (_set("dk", 999), ("dk", "999")),
    "D a string": (_set("D", "128"), ("'D'",)),
    "D wrong": (_set("D", 64), ("D=64",)),
    "stored_rank wrong": (_set("stored_rank", 3), ("stored_rank",)),
    "entry a list": (lambda m: m.__setitem__(FEAT, [128, 5]), ("must be an object",)),
    "no k": (lambda m: m[FEAT].pop("k"), ("'k'",)),
    "tensors missing": (lambda m: m.__setitem__("ghost.feature", {"D": 128, "k": 1}), ("ghost.feature", "missing")),
}


@pytest.mark.parametrize("case", list(FEATURE_FIELD_CASES))
def test_damaged_feature_fields_are_refused(tmp_path, good_file, case):
    fn, fields = FEATURE_FIELD_CASES[case]
    refused(edited(tmp_path, good_file, meta={"features": _features_meta(good_file, fn)}), *fields)


def test_edit_after_saving_fails_the_checksum(tmp_path, good_file):
    t, _ = read_raw(good_file)
    sig = t[f"{FEAT}::sigma"].clone()
    sig[0] *= 1e4  # still finite, non-negative, non-increasing: only the checksum sees it (k would drop to 1)
    refused(edited(tmp_path, good_file, keep_checksum=True, tensors={f"{FEAT}::sigma": sig}), "checksum")
    g = json.loads(read_raw(good_file)[1]["gains"])
    g[FEAT]["change/o1_N2_w3"] = 0.1  # a plausible but wrong gain
    refused(edited(tmp_path, good_file, keep_checksum=True, meta={"gains": json.dumps(g)}), "checksum")


def test_fitted_gains_damage_is_seen_at_load_not_at_use(tmp_path, good_file):
    """Corrupted gains used to surface as an AttributeError only when fitted_gains=True was used."""
    refused(edited(tmp_path, good_file, meta={"gains": json.dumps({FEAT: 3})}), "'gains'")


# -- property-based fuzzing ---------------------------------------------------------------------
def _loads_or_refuses(emb, path) -> str:
    """Either a one-line ValueError naming the file, or an image as close as the untouched basis gives."""
    try:
        b = svdcache.load_basis(path)
    except ValueError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        return "refused"
    try:
        err = emb.err_with(b)
    except ValueError as e:  # refused at enable (e.g. an edited model class): also one line naming the file
        assert not svdcache.is_enabled(emb.pipe)
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        return "refused at enable"
    assert err <= emb.good_err * 1.02 + 1e-5, (err, emb.good_err)
    return "loaded"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(pos=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_fuzz_bit_flips(emb, good_file, scratch, pos, bit):
    raw = bytearray(good_file.read_bytes())
    i = int(pos * len(raw))
    raw[i] ^= 1 << bit
    path = scratch / "flip.safetensors"
    path.write_bytes(bytes(raw))
    event(_loads_or_refuses(emb, path))


@FUZZ
@given(which=st.sampled_from(["V", "dV"]), feat=st.integers(0, 17), log_eps=st.floats(-8, 0),
       mode=st.sampled_from(["noise", "scale", "column"]), seed=st.integers(0, 2**16))
def test_fuzz_perturbed_subspaces_saved_by_save(emb, good_file, scratch, which, feat, log_eps, mode, seed):
    """Edited through the API (so the checksum is fresh): only the structural checks stand between
    the edit and the image."""
    b = svdcache.load_basis(good_file)
    name = sorted(b.features)[feat]
    fb = (b.features if which == "V" else b.changes)[name]
    g = torch.Generator().manual_seed(seed)
    eps = 10.0 ** log_eps
    if mode == "noise":
        fb.V = fb.V + eps * torch.randn(fb.V.shape, generator=g)
    elif mode == "scale":
        fb.V = fb.V * (1 + eps * (1 if seed % 2 else -1))
    else:
        V = fb.V.clone()
        V[:, seed % V.shape[1]] *= 1 + eps
        fb.V = V
    path = scratch / "perturbed.safetensors"
    b.save(path)
    event(_loads_or_refuses(emb, path))


_META_VALUES = st.one_of(
    st.text(max_size=12), st.integers(-3, 300).map(str), st.floats(allow_nan=True, allow_infinity=True).map(json.dumps),
    st.sampled_from(["{}", "[]", "null", '{"a": 1}', "true", "1e6", '{"x": {"D": 1}}']),
)


@FUZZ
@given(key=st.sampled_from(["features", "gains", "tau", "steps", "granularity", "model_class", "format",
                            "checksum", "prompt", "config_fingerprint", "feature_shapes", "my_tool"]),
       value=st.one_of(st.none(), _META_VALUES), keep=st.booleans())
def test_fuzz_metadata_edits(emb, good_file, scratch, key, value, keep):
    event(_loads_or_refuses(emb, edited(scratch, good_file, keep_checksum=keep, meta={key: value}, name="meta.safetensors")))


@FUZZ
@given(feat=st.integers(0, 17), field=st.sampled_from(["D", "k", "dk", "stored_rank"]),
       value=st.one_of(st.integers(-2, 200), st.floats(allow_nan=False), st.text(max_size=4), st.none(),
                       st.booleans(), st.lists(st.integers(), max_size=2)))
def test_fuzz_feature_fields(emb, good_file, scratch, feat, field, value):
    def fn(m):
        name = sorted(m)[feat]
        if value is None:
            m[name].pop(field, None)
        else:
            m[name][field] = value
    path = edited(scratch, good_file, meta={"features": _features_meta(good_file, fn)}, name="fields.safetensors")
    event(_loads_or_refuses(emb, path))


def test_handmade_basis_in_memory_round_trips(tmp_path):
    """A Basis built by hand (orthonormal V, sorted sigma) saves, loads and stays the same."""
    g = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(16, 4, generator=g))[0]
    sig = torch.sort(torch.rand(16, generator=g), descending=True).values
    b = Basis({"f": FeatureBasis(V=V, sigma=sig, k=2)}, {"model_class": "X"}, changes={"f": FeatureBasis(V=V, sigma=sig, k=3)})
    b.save(tmp_path / "h.safetensors")
    c = svdcache.load_basis(tmp_path / "h.safetensors")
    assert torch.equal(c.features["f"].V, V) and c.changes["f"].k == 3 and not math.isnan(c.features["f"].energy(2))


# -- the checksum covers every stored field (basis format 2) -------------------------------------
def _schedules(good_file):
    return json.loads(read_raw(good_file)[1]["schedules"])


def test_edited_plan_is_refused(tmp_path, good_file):
    """An edited calibrated plan used to load (the checksum left the schedules out) and gave 9 dB
    where 40.8 dB were expected; so did a single changed digit in a plan (38.2 dB)."""
    s = _schedules(good_file)
    fam = next(iter(s["plans"]))
    s["plans"][fam]["5"] = [0, 1, 2, 3, 4]  # a valid plan, the wrong one
    refused(edited(tmp_path, good_file, keep_checksum=True, meta={"schedules": json.dumps(s)}), "checksum")
    raw = read_raw(good_file)[1]["schedules"]
    one = raw.replace('"5": [0, 9, 22, 35, 48]', '"5": [0, 9, 23, 35, 48]')
    assert one != raw
    refused(edited(tmp_path, good_file, keep_checksum=True, meta={"schedules": one}, name="digit.safetensors"), "checksum")


def _changed(value: str) -> str:
    """A small edit of a stored metadata string that keeps it valid where it can: one digit up, else
    one letter changed, else a space appended."""
    for i, c in enumerate(value):
        if c.isdigit():
            return value[:i] + str((int(c) + 1) % 10) + value[i + 1:]
    for i, c in enumerate(value):
        if c.isalpha():
            return value[:i] + ("b" if c != "b" else "c") + value[i + 1:]
    return value + " "


def test_every_metadata_field_is_covered(tmp_path, good_file):
    _, m = read_raw(good_file)
    keys = [k for k in m if k != "checksum"]
    assert {"schedules", "gains", "granularity", "model_class", "tau", "steps", "prompt", "format_version"} <= set(keys)
    for key in keys:
        path = edited(tmp_path, good_file, keep_checksum=True, meta={key: _changed(m[key])}, name=f"{key}.safetensors")
        with pytest.raises(ValueError) as e:
            svdcache.load_basis(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), (key, str(e.value))
        # an added field is an edit too
    refused(edited(tmp_path, good_file, keep_checksum=True, meta={"note": "x"}, name="added.safetensors"), "checksum")
    for key in keys:
        if key not in ("format", "features", "format_version"):  # removing these is refused for its own reason
            refused(edited(tmp_path, good_file, keep_checksum=True, meta={key: None}, name="gone.safetensors"), "checksum")


def test_every_tensor_is_covered(tmp_path, good_file):
    t, _ = read_raw(good_file)
    for key in sorted(t):
        x = t[key].clone()
        flat = x.view(-1).view(torch.int32)
        flat[len(flat) // 2] ^= 1  # the lowest mantissa bit of one value: every structural check still passes
        refused(edited(tmp_path, good_file, keep_checksum=True, tensors={key: x}, name="t.safetensors"), "checksum")


def test_file_without_checksum_is_refused_with_the_fix(tmp_path, good_file):
    path = edited(tmp_path, good_file)  # the checksum field removed: this used to switch the check off
    msg = refused(path, "no checksum", "resave", "recalibrate")
    with pytest.raises(ValueError, match="trust=True"):
        svdcache.basis.resave(path)
    svdcache.basis.resave(path, trust=True)  # the user vouches for it: values unchanged, checksum added
    assert _same_content(read_raw(path), read_raw(good_file), but={"checksum"})
    svdcache.load_basis(path)
    assert "\n" not in msg


def _same_content(a, b, but=()):
    (ta, ma), (tb, mb) = a, b
    same_t = set(ta) == set(tb) and all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    keys = (set(ma) | set(mb)) - set(but)
    return same_t and all(ma.get(k) == mb.get(k) for k in keys)


def _format_1(tmp_path, good_file, name="v1.safetensors", **edits):
    """The good file as svdcache 0.1.0 wrote it: format_version 1 and the old checksum."""
    from svdcache.basis_io import checksum_v1

    t, m = read_raw(good_file)
    for k, v in edits.items():
        m[k] = v
    m["format_version"] = "1"
    m["checksum"] = checksum_v1(t, m)
    return write_raw(tmp_path / name, t, m)


def test_format_1_file_is_refused_and_resaved_unchanged(tmp_path, good_file):
    path = _format_1(tmp_path, good_file)
    refused(path, "format 1", "resave")
    out = svdcache.basis.resave(path, tmp_path / "v2.safetensors")
    assert _same_content(read_raw(out), read_raw(good_file))  # bit-identical to what this version saves
    assert _same_content(read_raw(path), read_raw(good_file), but={"checksum", "format_version"})  # source untouched
    b, g = svdcache.load_basis(out), svdcache.load_basis(good_file)
    assert b.meta == g.meta and all(torch.equal(b.features[n].V, g.features[n].V) for n in g.features)
    svdcache.basis.resave(path)  # in place
    svdcache.load_basis(path)


def test_resave_refuses_a_damaged_format_1_file(tmp_path, good_file):
    path = _format_1(tmp_path, good_file)
    t, m = read_raw(path)
    t[f"{FEAT}::sigma"] = t[f"{FEAT}::sigma"] * 1.5
    write_raw(path, t, m)
    with pytest.raises(ValueError, match="format-1 checksum"):
        svdcache.basis.resave(path)
    assert read_raw(path)[1]["format_version"] == "1"  # nothing replaced


def test_unknown_format_version_is_refused(tmp_path, good_file):
    refused(edited(tmp_path, good_file, resign=True, meta={"format_version": "3"}), "format_version", "upgrade")


def test_shipped_basis_files_are_format_2():
    """The repository's basis files carry the checksum over every field (re-saved, values unchanged)."""
    import glob
    import os

    root = os.path.join(os.path.dirname(svdcache.__file__), "embedded")
    files = sorted(glob.glob(os.path.join(root, "*", "svdcache_basis*.safetensors")))
    assert len(files) >= 3
    for f in files:
        _, m = read_raw(f)
        assert m["format_version"] == "2" and m["checksum"].startswith("sha256:"), f
        svdcache.load_basis(f)


@FUZZ
@given(pos=st.floats(0.0, 1.0, exclude_max=True), bit=st.integers(0, 7))
def test_fuzz_header_bit_flips(good_file, scratch, pos, bit):
    """A flipped bit anywhere in the header (tensor table and every metadata field): refused, or the
    file reads back to exactly the same content."""
    raw = bytearray(good_file.read_bytes())
    n = 8 + int.from_bytes(raw[:8], "little")
    i = int(pos * n)
    raw[i] ^= 1 << bit
    path = scratch / "hflip.safetensors"
    path.write_bytes(bytes(raw))
    try:
        svdcache.load_basis(path)
    except ValueError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        event("refused")
        return
    assert _same_content(read_raw(path), read_raw(good_file))
    event("same content")


def test_load_basis_of_a_folder_names_it(tmp_path):
    """load_basis(<pipeline folder>) said "No such device": now one line naming the folder and the
    basis file inside it."""
    from svdcache.embedded import BASIS_PATH, PIPELINE_DIR

    with pytest.raises(IsADirectoryError) as e:
        svdcache.load_basis(PIPELINE_DIR)
    msg = str(e.value)
    assert "\n" not in msg and PIPELINE_DIR in msg and "folder" in msg and BASIS_PATH in msg, msg
    wan = os.path.join(os.path.dirname(PIPELINE_DIR), "tiny-wan-digits")
    with pytest.raises(IsADirectoryError, match="2 basis files .*svdcache_basis.safetensors"):
        svdcache.load_basis(wan)
    with pytest.raises(IsADirectoryError, match="no svdcache basis file"):
        svdcache.load_basis(tmp_path)
    with pytest.raises(IsADirectoryError, match="folder"):
        svdcache.enable(torch.nn.Linear(2, 2), basis=str(tmp_path))
