"""Bases on the Hub convention, offline: a fake snapshot in a temporary Hugging Face cache
(HF_HUB_OFFLINE=1, local files only), folders with a subfolder, push_to_hub against a fake HfApi
that writes into that cache, and the model id / revision recorded in the file."""
from __future__ import annotations

import os

import pytest
import torch

import svdcache
from svdcache import hub
from svdcache.basis import Basis, FeatureBasis

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _basis(seed=0, D=16, k=4):
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for name in ("blocks.0.attn", "blocks.0.ff"):
        V, _ = torch.linalg.qr(torch.randn(D, k, generator=g))
        feats[name] = FeatureBasis(V=V, sigma=torch.linspace(2.0, 1.0, k), k=2)
    return Basis(features=feats, meta={"model_class": "TinyModel", "tau": 0.9})


def _snapshot(cache: str, repo: str, files: dict[str, Basis]) -> str:
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(COMMIT)
    for rel, basis in files.items():
        path = os.path.join(root, "snapshots", COMMIT, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        basis.save(path)
    return root


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(home / "hub"))
    return str(home / "hub")


def _same(a: Basis, b: Basis):
    assert set(a.features) == set(b.features)
    for n in a.features:
        assert torch.equal(a.features[n].V, b.features[n].V)
        assert a.features[n].k == b.features[n].k


def test_load_basis_from_a_repo_id_offline(offline_cache):
    want, other = _basis(0), _basis(1)
    _snapshot(offline_cache, "org/tiny-svdcache", {hub.FILENAME: want, f"transformer/{hub.FILENAME}": other})
    got = svdcache.load_basis("org/tiny-svdcache")
    _same(got, want)
    assert got.meta["hub_repo"] == "org/tiny-svdcache"
    _same(Basis.from_pretrained("org/tiny-svdcache", subfolder="transformer", cache_dir=offline_cache), other)


def test_missing_offline_entry_is_one_clear_error(offline_cache):
    _snapshot(offline_cache, "org/tiny-svdcache", {hub.FILENAME: _basis(0)})
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        Basis.from_pretrained("org/tiny-svdcache", subfolder="nope")
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        svdcache.load_basis("org/absent-repo")


def test_folder_and_file(tmp_path):
    b = _basis(2)
    (tmp_path / "transformer").mkdir()
    b.save(tmp_path / "transformer" / hub.FILENAME)
    _same(Basis.from_pretrained(str(tmp_path), subfolder="transformer"), b)
    _same(Basis.from_pretrained(str(tmp_path / "transformer" / hub.FILENAME)), b)
    with pytest.raises(FileNotFoundError, match="no basis file"):
        Basis.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a basis file"):
        Basis.from_pretrained(str(tmp_path / "missing.safetensors"))


def test_push_to_hub_round_trip_records_the_model(offline_cache, monkeypatch):
    """push_to_hub through a fake HfApi that writes the upload into the offline cache; the file
    loads back through the Hub path and says which model (id, revision) it was calibrated on."""
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            self.token = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create", repo_id, exist_ok))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, revision=None, commit_message=None):
            calls.append(("upload", repo_id, path_in_repo))
            _snapshot(offline_cache, repo_id, {path_in_repo: Basis.load(path_or_fileobj)})
            return type("CommitInfo", (), {"commit_url": f"https://hf.co/{repo_id}/commit/{COMMIT}"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)

    class Model(torch.nn.Module):
        config = {"_name_or_path": "black-forest-labs/FLUX.1-dev", "_commit_hash": "abc123"}

    b = _basis(3)
    url = svdcache.push_to_hub(b, "me/flux-svdcache", subfolder="transformer", model=Model())
    assert url.endswith(COMMIT)
    assert calls == [("create", "me/flux-svdcache", True), ("upload", "me/flux-svdcache", f"transformer/{hub.FILENAME}")]
    got = Basis.from_pretrained("me/flux-svdcache", subfolder="transformer")
    _same(got, b)
    assert (got.meta["model_id"], got.meta["model_revision"]) == ("black-forest-labs/FLUX.1-dev", "abc123")
    with pytest.raises(ValueError, match="repo id"):
        svdcache.push_to_hub(b, "not a repo id")


def test_calibrate_records_the_model_id():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                  pooled_projection_dim=8, out_channels=4).eval()
    model.register_to_config(_name_or_path="stabilityai/tiny-sd3")
    kw = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 5, 16),
              pooled_projections=torch.randn(1, 8), return_dict=False)

    def run():
        for t in (900.0, 600.0, 300.0):
            model(timestep=torch.tensor([t]), **kw)

    basis = svdcache.calibrate(model, run=run, progress=False)
    assert basis.meta["model_id"] == "stabilityai/tiny-sd3"


def test_basis_and_hub_do_not_import_each_other():
    """svdcache.basis and svdcache.hub imported each other (lazily, inside functions): the Hub path
    now lives in svdcache.basis_io, which imports neither; hub builds on basis, never the reverse."""
    import ast

    def imported(mod):
        tree = ast.parse(open(mod.__file__).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = ("." * node.level) + (node.module or "")
                names.add(base)
                names.update(f"{base}.{a.name}" if node.module else f"{base}{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    from svdcache import basis, basis_io

    assert not {".hub", "svdcache.hub"} & imported(basis)
    assert not {".hub", ".basis", "svdcache.hub", "svdcache.basis"} & imported(basis_io)
    # the public paths a hub id takes still work from both modules
    assert basis.load_basis.__module__ == "svdcache.basis" and hub.from_pretrained.__module__ == "svdcache.hub"
    assert hub.resolve is basis_io.resolve and hub.FILENAME == basis_io.FILENAME


def test_load_basis_in_the_basis_module_takes_a_repo_id(offline_cache):
    from svdcache.basis import load_basis

    want = _basis(4)
    _snapshot(offline_cache, "org/direct", {hub.FILENAME: want})
    got = load_basis("org/direct")
    _same(got, want)
    assert got.meta["hub_repo"] == "org/direct"
