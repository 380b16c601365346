"""FLUX (FluxTransformer2DModel), module level like TaylorSeer: the pre-gate outputs of attention and
feed-forward of both streams in the double blocks and the pre-gate proj_out output of the single
blocks are cached. On a cached step only the AdaLN gates are computed (for the current step) and
the gated residual adds are fused into the reconstruction; attention and MLPs are skipped.

With every block of the exact class planned here (:func:`_whole_stack`), a cached call is one
operation for the whole stack: the first block computes all gates and defers every image-stream
feature, the blocks in between are bypassed, the last one sums all forecasts into the image stream
(svdcache.deferred); the text stream, which the model drops after its blocks, holds no state.
"""
from __future__ import annotations

import torch

from .base import BlockAdapter, bind_arguments


def _gates(norm: torch.nn.Module, temb: torch.Tensor, n_chunks: int) -> tuple[torch.Tensor, ...]:
    # AdaLayerNormZero(/Single).forward without normalising x: the gates depend on temb only
    return norm.linear(norm.silu(temb)).chunk(n_chunks, dim=1)


def _dim(block) -> int:
    """The stream width of a FLUX double or single block, from its LayerNorm (no Linear read: a LoRA
    layer or another wrapper may stand in for one)."""
    norm = block.norm2 if hasattr(block, "norm2") else block.norm.norm
    return norm.normalized_shape[0]


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class _SiluOnce:
    """silu(temb) once per transformer call (every block's AdaLN gets the same temb tensor), and its
    batch-of-2 expansion for the double blocks' batched gate GEMM."""

    __slots__ = ("temb", "version", "out", "out2")

    def __init__(self):
        self.temb = self.version = self.out = self.out2 = None

    def __call__(self, temb: torch.Tensor) -> torch.Tensor:
        # an inference tensor (torch.inference_mode) has no version counter: the identity decides (the
        # model makes a new temb per call; none is changed in place between its blocks)
        if temb is not self.temb or (self.version is not None and temb._version != self.version):
            self.temb, self.version = temb, _version_of(temb)
            self.out = torch.nn.functional.silu(temb)
            self.out2 = None
        return self.out

    def twice(self, temb: torch.Tensor) -> torch.Tensor:
        s = self(temb)
        if self.out2 is None:
            self.out2 = s.expand(2, *s.shape)
        return self.out2


_SILU = _SiluOnce()


def _version_of(t):
    """``t``'s version counter; None for an absent tensor, a non-tensor or an inference tensor (made under
    torch.inference_mode: it has none, and can be changed in place only there)."""
    if not isinstance(t, torch.Tensor) or t.is_inference():
        return None
    return t._version


def _gate_weights(lin: torch.nn.Linear, n_chunks: int, pairs: bool):
    """Views (no copies) of the gate rows of an AdaLN linear, transposed for a GEMM, and its bias:
    the gate chunk of AdaLayerNormZeroSingle (chunk 2 of 3) as (dim, D) and (D,); gate_msa and
    gate_mlp of AdaLayerNormZero (chunks 2 and 5 of 6: one strided view) as (2, dim, D) and
    (2, 1, D). Made once per module and re-made when the weight is replaced or changed in place
    (a LoRA fuse), so a cached step reads only the gate rows (1/3 of the modulation weights). None for
    weights whose rows cannot be viewed (see :func:`_plain_weights`). Re-checked by the weight's and
    bias's identity, version and address, read from ``_parameters`` (57 blocks per cached call)."""
    params = lin._parameters
    w, bias = params.get("weight"), params.get("bias")
    if w is None:  # not a parameter (a dynamic-quantized Linear's weight() method, a plain tensor attribute,
        # a wrapper's: a LoRA layer's base weight, or none)
        w, bias = getattr(lin, "weight", None), getattr(lin, "bias", None)
    ent = lin.__dict__.get("_svdcache_gate_rows")
    # (a version None: an inference tensor, checked by identity and address only)
    if (ent is not None and ent[0] is w and (ent[1] is None or ent[1] == w._version) and ent[3] is bias
            and (ent[5] is None or ent[2] == w.data_ptr()) and (ent[4] is None or ent[4] == bias._version)):
        return ent[5]
    if not _plain_weights(lin):
        lin.__dict__["_svdcache_gate_rows"] = (w, _version_of(w), _ptr(w), bias, _version_of(bias), None)
        return None
    W = w.detach()
    D, dim = W.shape[0] // n_chunks, W.shape[1]
    b = None if bias is None else bias.detach()
    if pairs:  # chunks 2 and 5 of 6 = chunk 2 of each half: a (2, D, dim) view
        Wt = W.view(2, 3, D, dim)[:, 2].transpose(1, 2)
        b = None if b is None else b.view(2, 3, D)[:, 2].unsqueeze(1)
    else:
        Wt = W[2 * D:3 * D].t()
        b = None if b is None else b[2 * D:3 * D]
    # the weight and bias objects are held (so their addresses are not reused), with their versions
    lin.__dict__["_svdcache_gate_rows"] = (w, _version_of(w), w.data_ptr(), bias, _version_of(bias), (Wt, b))
    return Wt, b


def _ptr(w):
    try:
        return w.data_ptr()
    except Exception:  # a method (dynamic-quantized Linear) or a tensor subclass without storage
        return None


def _plain_weights(*lins) -> bool:
    """Linears whose weight is a plain tensor, one whose gate rows can be viewed: not a dynamic-quantized
    Linear's (``weight`` is a method) nor a tensor subclass's such as torchao's int8 weights (no view
    or transpose ops); a DTensor (tensor parallelism) is viewed like a plain one. And modules that compute
    ``x W^T + b`` of that weight: a torch Linear with its own forward, not a wrapper (a LoRA layer adds its
    low-rank term to its base weight's) nor a Linear whose forward was replaced."""
    for lin in lins:
        if (not isinstance(lin, torch.nn.Linear) or type(lin).forward is not torch.nn.Linear.forward
                or "forward" in lin.__dict__):
            return False
        w = getattr(lin, "weight", None)
        if not isinstance(w, torch.Tensor):
            return False
        if type(w) not in (torch.Tensor, torch.nn.Parameter) and type(w).__name__ != "DTensor":
            return False
    return True


def _double_gates(block, temb, buffer, text=True):
    """gate_msa, gate_mlp, c_gate_msa, c_gate_mlp of a cached step, each (B, 1, D): two batched
    GEMMs on the gate rows only, written into one runtime buffer (no allocation per block). Without
    ``text`` the text stream's pair is not computed (None)."""
    if not _plain_weights(block.norm1.linear, block.norm1_context.linear):  # e.g. int8 Linears: whole modulation
        _, _, g1, _, _, g2 = _gates(block.norm1, temb, 6)
        _, _, c1, _, _, c2 = _gates(block.norm1_context, temb, 6)
        return g1.unsqueeze(1), g2.unsqueeze(1), c1.unsqueeze(1), c2.unsqueeze(1)
    s2 = _SILU.twice(temb)
    Wt, b = _gate_weights(block.norm1.linear, 6, True)
    Wc, bc = _gate_weights(block.norm1_context.linear, 6, True)
    B, D = temb.shape[0], Wt.shape[-1]
    if s2.dtype != Wt.dtype:
        s2 = s2.to(Wt.dtype)
    if buffer is None:
        g = torch.baddbmm(b, s2, Wt) if b is not None else torch.bmm(s2, Wt)
        gc = torch.baddbmm(bc, s2, Wc) if bc is not None else torch.bmm(s2, Wc)
        return g[0].unsqueeze(1), g[1].unsqueeze(1), gc[0].unsqueeze(1), gc[1].unsqueeze(1)
    gb = buffer("flux.gates.double", (4, B, 1, D), Wt.dtype, temb.device)
    views = _VIEWS.get(("d", id(gb)))
    if views is None or views[0] is not gb:
        views = (gb, gb[0:2].view(2, B, D), gb[2:4].view(2, B, D), gb.unbind(0))
        _VIEWS[("d", id(gb))] = views
    _, out1, out2, gates = views
    torch.baddbmm(b, s2, Wt, out=out1) if b is not None else torch.bmm(s2, Wt, out=out1)
    if not text:
        return gates[0], gates[1], None, None
    torch.baddbmm(bc, s2, Wc, out=out2) if bc is not None else torch.bmm(s2, Wc, out=out2)
    return gates


def _single_gate(block, temb, buffer):
    """The single block's gate of a cached step, (B, 1, D): one GEMM on its gate rows."""
    if not _plain_weights(block.norm.linear):
        return _gates(block.norm, temb, 3)[2].unsqueeze(1)
    s = _SILU(temb)
    Wt, b = _gate_weights(block.norm.linear, 3, False)
    if s.dtype != Wt.dtype:
        s = s.to(Wt.dtype)
    if buffer is None:
        return (torch.addmm(b, s, Wt) if b is not None else torch.mm(s, Wt)).unsqueeze(1)
    B, D = temb.shape[0], Wt.shape[-1]
    gb = buffer("flux.gates.single", (B, 1, D), Wt.dtype, temb.device)
    views = _VIEWS.get(("s", id(gb)))
    if views is None or views[0] is not gb:
        views = (gb, gb.view(B, D))
        _VIEWS[("s", id(gb))] = views
    torch.addmm(b, s, Wt, out=views[1]) if b is not None else torch.mm(s, Wt, out=views[1])
    return gb


# views of the runtime's buffers, made once per buffer (keyed by id, checked by identity)
_VIEWS: dict = {}


def _owned(x: torch.Tensor, buf: torch.Tensor) -> bool:
    """x is exactly the runtime's buffer (the previous cached block's output in this call)."""
    return x is buf


class _WholeStack:
    """FluxTransformer2DModel with all its blocks planned at module level (see :func:`_whole_stack`). On a
    cached call its forward gives every block the same ``temb``, so the first block computes the gates
    of all blocks (one GEMM each on the gate rows, into one runtime buffer) and defers every image-stream
    feature at once; the blocks in between pass the streams on as they came (the runtime returns their
    inputs without entering the adapter) and the last one sums the forecasts into the image stream
    (svdcache.deferred). Per block a cached call then costs one gate GEMM."""

    def __init__(self, model, blocks):
        names = {id(b): n for n, b, _ in blocks}
        self.double = [(names[id(b)], b, b.norm1.linear) for b in model.transformer_blocks]
        self.single = [(names[id(b)], b, b.norm.linear) for b in model.single_transformer_blocks]
        every = [b for _, b, _ in self.double + self.single]
        self.D = _dim(every[0])
        self.first, self.last_module = id(every[0]), every[-1]
        self.last = id(every[-1])
        self._views = None  # (gate buffer, text length, GEMM outputs, deferred items)

    def defer_all(self, forecast, temb: torch.Tensor, L: int) -> None:
        nd, ns = len(self.double), len(self.single)
        w0 = getattr((self.double or self.single)[0][2], "weight", None)  # the gates' dtype: the weights'
        D, B = self.D, temb.shape[0]
        G = forecast.buffer("flux.gates.all", (2 * nd + ns, B, 1, D), getattr(w0, "dtype", temb.dtype), temb.device)
        v = self._views
        if v is None or v[0] is not G or v[1] != L:
            outs, items = [], []
            for i, (n, _, _) in enumerate(self.double):
                outs.append(G[2 * i:2 * i + 2].view(2, B, D))
                items += [(n + ".attn.img", G[2 * i], 0), (n + ".ff", G[2 * i + 1], 0)]
            for j, (n, _, _) in enumerate(self.single):
                outs.append(G[2 * nd + j].view(B, D))
                items.append((n + ".proj_out", G[2 * nd + j], L))  # its image rows follow the text rows
            self._views = v = (G, L, outs, items)
        outs = v[2]
        s = s2 = None
        for (_, block, lin), o in zip(self.double, outs):
            wb = _gate_weights(lin, 6, True)
            if wb is None:  # e.g. int8 Linears: the whole modulation
                _, _, g1, _, _, g2 = _gates(block.norm1, temb, 6)
                o.copy_(torch.stack([g1, g2]))
                continue
            Wt, b = wb
            if s2 is None:
                s2 = _SILU.twice(temb)
                s2 = s2.to(Wt.dtype) if s2.dtype != Wt.dtype else s2
            torch.baddbmm(b, s2, Wt, out=o) if b is not None else torch.bmm(s2, Wt, out=o)
        for (_, block, lin), o in zip(self.single, outs[nd:]):
            wb = _gate_weights(lin, 3, False)
            if wb is None:
                o.copy_(_gates(block.norm, temb, 3)[2])
                continue
            Wt, b = wb
            if s is None:
                s = _SILU(temb)
                s = s.to(Wt.dtype) if s.dtype != Wt.dtype else s
            torch.addmm(b, s, Wt, out=o) if b is not None else torch.mm(s, Wt, out=o)
        forecast.defer_all(v[3], until=self.last_module)


def _whole_stack(model, blocks):
    """A :class:`_WholeStack` when ``model`` is exactly FluxTransformer2DModel with all its blocks planned
    here at module level, else None. Its forward drops the text stream after the last single block and
    only adds to the image stream between blocks (ControlNet residuals), and on a cached call every
    block's output is x + gate * F_hat: so the image rows never read the text rows (the text features
    need no forecast), and the image stream after the last block is its input plus every block's gated
    forecasts (summed at once). A subclass may override forward: not taken."""
    from diffusers import FluxTransformer2DModel

    ours = {id(b) for _, b, a in blocks if isinstance(a, (FluxDoubleBlockAdapter, FluxSingleBlockAdapter))}
    lists = [list(getattr(model, "transformer_blocks", ())), list(getattr(model, "single_transformer_blocks", ()))]
    every = [b for lst in lists for b in lst]
    ok = (type(model) is FluxTransformer2DModel and len(ours) == len(blocks) == len(every)
          and all(id(b) in ours for b in every) and len(every) > 0)
    return _WholeStack(model, blocks) if ok else None


class _StackMixin:
    #: the text stream's forecasts are skipped on cached steps (see _whole_stack)
    text_unused = False
    stack = None

    def bind(self, model, blocks):
        self.stack = _whole_stack(model, blocks)
        self.text_unused = self.stack is not None

    def passthrough(self, block, args, kwargs):
        """A block between the first and the last of a whole-stack cached call: its streams as they came."""
        a = bind_arguments(block, args, kwargs)
        return a["encoder_hidden_states"], a["hidden_states"]

    def _deferred_forward(self, block, a, forecast):
        """The cached forward of the whole-stack path: (text stream, image stream) as they came, the
        image stream summed at the last block; None where it does not apply."""
        stk = self.stack
        if stk is None or not getattr(forecast, "can_defer", False):
            return None
        enc, hs = a["encoder_hidden_states"], a["hidden_states"]
        if enc is None:
            return None
        if id(block) == stk.first:
            with torch.no_grad():
                stk.defer_all(forecast, a["temb"], enc.shape[1])
        if id(block) != stk.last:
            return enc, hs
        out = forecast.buffer("flux.sum.img", hs.shape, hs.dtype, hs.device)
        with torch.no_grad():  # a cached step is not differentiated
            forecast.flush(hs, out)
        if out.dtype == torch.float16:
            out.clamp_(-65504, 65504)
        return enc, out


class FluxDoubleBlockAdapter(_StackMixin, BlockAdapter):
    granularity = "module"
    plain_full_forward = True  # the capture hooks on attn / ff / ff_context record

    def feature_dims(self, block):
        D = _dim(block)
        return {"attn.img": D, "attn.txt": D, "ff": D, "ff_context": D}

    def watched_paths(self, block):
        return ["norm1.linear", "norm1_context.linear"]  # their gate rows are read directly

    def unread_features(self, block):
        # the text stream's features, where nothing after the blocks reads it (see _whole_stack)
        return {"attn.txt", "ff_context"} if self.text_unused else set()

    def capture_points(self, block):
        return [
            ("attn", block.attn, [("attn.img", 0), ("attn.txt", 1)]),
            ("ff", block.ff, [("ff", None)]),
            ("ff_context", block.ff_context, [("ff_context", None)]),
        ]

    def check_call(self, kwargs):
        # the transformer hands its joint_attention_kwargs to every block: refused once, before any work
        if "ip_adapter_image_embeds" in (kwargs.get("joint_attention_kwargs") or {}):
            raise NotImplementedError("SVD-Cache does not cache FLUX blocks with IP-Adapter attention yet")

    def cached_forward(self, block, args, kwargs, forecast):
        a = bind_arguments(block, args, kwargs)
        hs, ehs = a["hidden_states"], a["encoder_hidden_states"]
        buffer = getattr(forecast, "buffer", None)
        res = self._deferred_forward(block, a, forecast)
        if res is not None:
            return res
        skip_text = self.text_unused and buffer is not None and ehs is not None
        with torch.no_grad():  # a cached step is not differentiated (the forecast ops run without grad too)
            gate_msa, gate_mlp, c_gate_msa, c_gate_mlp = _double_gates(block, a["temb"], buffer, text=not skip_text)
        if buffer is None or ehs is None:  # a forecast callable without buffers (or no text stream)
            h = forecast("attn.img", x=hs, gate=gate_msa)
            h = forecast("ff", x=h, gate=gate_mlp, out=h)
            e = forecast("attn.txt", x=ehs, gate=c_gate_msa)
            e = ehs if e is None else e  # an unread text feature holds no state
            e2 = forecast("ff_context", x=e, gate=c_gate_mlp, out=e)
            e = e if e2 is None else e2
            return _clip_fp16(e), h
        # Outputs into two runtime buffers reused by every double block of the call: the first block
        # reads the model's streams and writes the buffers, each next one updates them in place.
        hb = buffer("flux.double.img", hs.shape, hs.dtype, hs.device)
        forecast("attn.img", x=hs, gate=gate_msa, out=hb)
        forecast("ff", x=hb, gate=gate_mlp, out=hb)
        if skip_text:
            return ehs, hb  # the text stream as it came in: nothing after the blocks reads it
        eb = buffer("flux.double.txt", (hs.shape[0], *ehs.shape[1:]), ehs.dtype, ehs.device)
        forecast("attn.txt", x=ehs, gate=c_gate_msa, out=eb)
        forecast("ff_context", x=eb, gate=c_gate_mlp, out=eb)
        if eb.dtype == torch.float16:
            eb.clamp_(-65504, 65504)
        return eb, hb


class FluxSingleBlockAdapter(_StackMixin, BlockAdapter):
    granularity = "module"
    plain_full_forward = True  # proj_out's capture hook records

    def feature_dims(self, block):
        return {"proj_out": _dim(block)}  # proj_out maps back to the stream (it may be a wrapper: a LoRA layer)

    def capture_points(self, block):
        return [("proj_out", block.proj_out, [("proj_out", None)])]

    def watched_paths(self, block):
        return ["norm.linear"]  # its gate rows are read directly

    def cached_forward(self, block, args, kwargs, forecast):
        a = bind_arguments(block, args, kwargs)
        enc, hs = a["encoder_hidden_states"], a["hidden_states"]
        buffer = getattr(forecast, "buffer", None)
        res = self._deferred_forward(block, a, forecast)
        if res is not None:
            return res
        with torch.no_grad():
            gate = _single_gate(block, a["temb"], buffer)
        L = enc.shape[1]
        if buffer is None:
            x = torch.cat([enc, hs], dim=1)
            x = _clip_fp16(forecast("proj_out", x=x, gate=gate, out=x))
            return x[:, :L], x[:, L:]
        # The joined stream lives in one runtime buffer for the whole call: the first single block
        # copies the two streams into it, every block forecasts into it in place and returns views
        # of it, which the next block recognises (no torch.cat per block).
        B, D = hs.shape[0], hs.shape[-1]
        shape = (B, L + hs.shape[1], D)
        x = buffer("flux.single", shape, hs.dtype, hs.device)
        views = self._views.get(id(x))
        if views is None or views[0] is not x or views[1].shape[1] != L:
            views = (x, x[:, :L], x[:, L:])
            self._views = {id(x): views}
        _, ev, hv = views
        if not (_owned(enc, ev) and _owned(hs, hv)):
            with torch.no_grad():  # the model's own text stream may carry grad (a cached step is not differentiated)
                ev.copy_(enc)  # broadcasts a batch-1 text stream
                hv.copy_(hs)
        forecast("proj_out", x=x, gate=gate, out=x)
        if x.dtype == torch.float16:
            x.clamp_(-65504, 65504)
        return ev, hv

    def __init__(self):
        super().__init__()
        self._views: dict[int, tuple] = {}


ADAPTERS = {
    "FluxTransformerBlock": FluxDoubleBlockAdapter,
    "FluxSingleTransformerBlock": FluxSingleBlockAdapter,
}
