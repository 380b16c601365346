"""Configs of the embedded miniature FLUX pipeline, built offline with random weights.

Every component is a stock diffusers/transformers class, so the real ``FluxPipeline.__call__``
path (prompt encoding, latent packing, flow-matching scheduler, VAE decode) runs end to end.
"""
from __future__ import annotations

import torch

from .data import all_prompts

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=64,  # 4 x latent_channels (2x2 packing)
    num_layers=3,  # double-stream blocks
    num_single_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,  # hidden size 128
    joint_attention_dim=64,  # = T5 d_model
    pooled_projection_dim=32,  # = CLIP hidden size
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),  # sums to the head dim
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),  # vae_scale_factor 2
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=1.0,  # replaced by the data's statistics after VAE training
    shift_factor=0.0,
)


def _clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # Character-level byte BPE (no merges): every alphabet char and its end-of-word form.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    # A small unigram vocabulary: whole words of the prompts, then single characters as fallback.
    words = sorted({w for p in all_prompts() for w in p.split()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in words]
    chars = sorted({c for p in all_prompts() for c in p.replace(" ", "")} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    pieces += [(c, -5.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def build_pipeline(seed: int = 0):
    """A FluxPipeline with every component tiny and randomly initialised (deterministic in ``seed``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok = _clip_tokenizer()
    tok2 = _t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok2),
            d_model=64,
            d_kv=32,
            d_ff=128,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = AutoencoderKL(**VAE_CONFIG)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=64, max_image_seq_len=256, base_shift=0.5, max_shift=1.15, use_dynamic_shifting=True,
        shift=1.0,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok2,
        transformer=transformer,
    )
    for m in (text_encoder, text_encoder_2, vae, transformer):
        m.eval().requires_grad_(False)
    return pipe
