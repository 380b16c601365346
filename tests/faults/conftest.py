"""Fixtures of the fault suite: the embedded pipeline (trained, 32 x 32), its shipped basis, and a
cheap latent-space generation to judge whether a basis that loads still gives the right image."""
import pytest
import torch

STEPS = 6
CACHE_KW = dict(interval=2, warmup=2)  # 2 cached steps of 6: a damaged basis shows in the latents


class Emb:
    """The embedded pipeline with its prompt encoded once; ``gen()`` returns final latents."""

    def __init__(self):
        from svdcache.embedded import CALL_KWARGS, canonical_prompt, load_pipeline

        self.pipe = load_pipeline()
        self.pipe.set_progress_bar_config(disable=True)
        self.kw = {k: v for k, v in CALL_KWARGS.items() if k != "max_sequence_length"}
        with torch.no_grad():
            pe, ppe, _ = self.pipe.encode_prompt(canonical_prompt(3), None, max_sequence_length=CALL_KWARGS["max_sequence_length"])
        self.embeds = dict(prompt_embeds=pe, pooled_prompt_embeds=ppe)
        self.steps = STEPS
        self.ref = self.gen()  # uncached
        self._good = None
        self._memo = {}

    def gen(self, seed=0, steps=STEPS):
        g = torch.Generator().manual_seed(seed)
        return self.pipe(num_inference_steps=steps, generator=g, output_type="latent", **self.embeds, **self.kw).images

    def err(self, out) -> float:
        return float((out - self.ref).norm() / self.ref.norm())

    # metadata the runtime never reads: a basis that differs only there gives the same image
    INERT_META = ("prompt", "images", "steps", "feature_shapes", "diffusers_version", "library_version",
                  "my_tool", "note")

    def _key(self, basis):
        import hashlib

        h = hashlib.sha256()
        for group in (basis.features, basis.changes):
            for n in sorted(group):
                fb = group[n]
                h.update(f"{n}:{fb.k}:{fb.V.dtype}".encode())
                h.update(fb.V.float().numpy().tobytes())
                h.update(fb.sigma.float().numpy().tobytes())
        meta = {k: v for k, v in basis.meta.items() if k not in self.INERT_META}
        return h.hexdigest(), repr(sorted(meta.items(), key=lambda kv: kv[0]))

    def err_with(self, basis) -> float:
        """Error of the latents with ``basis`` (memoised on what the runtime reads of it)."""
        key = self._key(basis)
        if key not in self._memo:
            self._memo[key] = self._err_with(basis)
        return self._memo[key]

    def _err_with(self, basis) -> float:
        import svdcache

        svdcache.enable(self.pipe, basis=basis, **CACHE_KW)
        try:
            return self.err(self.gen())
        finally:
            svdcache.disable(self.pipe)

    @property
    def good_err(self) -> float:
        """Error of the untouched shipped basis: what any basis that loads must match."""
        if self._good is None:
            from svdcache.embedded import load_basis

            self._good = self.err_with(load_basis())
        return self._good


@pytest.fixture(scope="session")
def emb():
    return Emb()


@pytest.fixture(scope="session")
def good_file(tmp_path_factory, emb):
    """The shipped basis saved by this version (with its checksum)."""
    from svdcache.embedded import load_basis

    path = tmp_path_factory.mktemp("basis") / "good.safetensors"
    load_basis().save(path)
    return path
