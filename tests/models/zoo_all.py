"""Tiny configs and inputs for the transformer classes of diffusers (every class exported from
diffusers.models.transformers with "Transformer" in its name that has a model test, plus three DiTs
named otherwise), copied from diffusers' own model tests (tests/models/transformers/test_models_*.py:
``get_init_dict`` / ``get_dummy_inputs``, batch 1 where the test allows it; PRX at width 64 instead
of the test's 1792). Written once from those tests by a script and kept here as data: no download at
test time.

``R(*shape)`` is a fresh standard-normal float tensor per call (``inputs(name, seed)``); ``T(values,
dtype)`` a literal tensor (ids, indices, masks, timesteps); ``F(path)`` a fresh object of that class.
Each entry: ``init`` (model kwargs), ``inputs`` (forward kwargs), ``main`` (the latent argument),
``timestep`` (the argument the denoising loop lowers each step), ``source`` (the diffusers test).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class R:
    shape: tuple

    def __init__(self, *shape):
        object.__setattr__(self, "shape", tuple(shape))


@dataclass(frozen=True)
class T:
    values: object
    dtype: str
    shape: tuple | None = None  # set: ``values`` broadcast to it (masks of ones)


@dataclass(frozen=True)
class F:
    path: str


def ones(*shape) -> T:
    return T([1.0], "float32", tuple(shape))


@dataclass
class Entry:
    init: dict
    inputs: dict
    main: str = "hidden_states"
    timestep: str | None = "timestep"
    source: str = ""
    extra: bool = False  # not named "...Transformer..." in diffusers


ZOO: dict[str, Entry] = {}

ZOO['DiTTransformer2DModel'] = Entry(
    init={'in_channels': 4,
         'out_channels': 8,
         'activation_fn': 'gelu-approximate',
         'num_attention_heads': 2,
         'attention_head_dim': 4,
         'attention_bias': True,
         'num_layers': 1,
         'norm_type': 'ada_norm_zero',
         'num_embeds_ada_norm': 8,
         'patch_size': 2,
         'sample_size': 8},
    inputs={
            'hidden_states': R(1, 4, 8, 8),
            'timestep': T([44], 'int64'),
            'class_labels': T([0], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_dit_transformer2d.py::DiTTransformer2DTesterConfig',
)

ZOO['PixArtTransformer2DModel'] = Entry(
    init={'sample_size': 8,
         'num_layers': 1,
         'patch_size': 2,
         'attention_head_dim': 2,
         'num_attention_heads': 2,
         'in_channels': 4,
         'cross_attention_dim': 8,
         'out_channels': 8,
         'attention_bias': True,
         'activation_fn': 'gelu-approximate',
         'num_embeds_ada_norm': 8,
         'norm_type': 'ada_norm_single',
         'norm_elementwise_affine': False,
         'norm_eps': 1e-06,
         'use_additional_conditions': False,
         'caption_channels': None},
    inputs={
            'hidden_states': R(1, 4, 8, 8),
            'timestep': T([44], 'int64'),
            'encoder_hidden_states': R(1, 8, 8),
            'added_cond_kwargs': {'aspect_ratio': None, 'resolution': None},
    },
    main='hidden_states', timestep='timestep', source='test_models_pixart_transformer2d.py::PixArtTransformer2DTesterConfig',
)

ZOO['PriorTransformer'] = Entry(
    init={'num_attention_heads': 2,
         'attention_head_dim': 4,
         'num_layers': 2,
         'embedding_dim': 8,
         'num_embeddings': 7,
         'additional_embeddings': 4},
    inputs={
            'hidden_states': R(1, 8),
            'timestep': 2,
            'proj_embedding': T([[1.5409960746765137, -0.293428897857666, -2.1787893772125244, 0.5684312582015991, -1.0845223665237427, -1.3985954523086548, 0.40334683656692505, 0.8380263447761536]], 'float32'),
            'encoder_hidden_states': R(1, 7, 8),
    },
    main='hidden_states', timestep='timestep', source='test_models_prior.py::PriorTransformerTesterConfig',
)

ZOO['AceStepTransformer1DModel'] = Entry(
    init={'hidden_size': 32,
         'intermediate_size': 64,
         'num_hidden_layers': 2,
         'num_attention_heads': 4,
         'num_key_value_heads': 2,
         'head_dim': 8,
         'in_channels': 24,
         'audio_acoustic_hidden_dim': 8,
         'patch_size': 2,
         'rope_theta': 10000.0,
         'rms_norm_eps': 1e-06,
         'sliding_window': 16},
    inputs={
            'hidden_states': R(2, 8, 8),
            'timestep': T([1.5409960746765137, 0.293428897857666], 'float32'),
            'timestep_r': T([1.5409960746765137, 0.293428897857666], 'float32'),
            'encoder_hidden_states': R(2, 10, 32),
            'context_latents': R(2, 8, 16),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_ace_step.py::AceStepTransformer1DModelTesterConfig',
)

ZOO['AllegroTransformer3DModel'] = Entry(
    init={'num_attention_heads': 2,
         'attention_head_dim': 8,
         'in_channels': 4,
         'out_channels': 4,
         'num_layers': 1,
         'cross_attention_dim': 16,
         'sample_width': 8,
         'sample_height': 8,
         'sample_frames': 8,
         'caption_channels': 8},
    inputs={
            'hidden_states': R(1, 4, 2, 8, 8),
            'encoder_hidden_states': R(1, 16, 8),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_allegro.py::AllegroTransformerTesterConfig',
)

ZOO['AnyFlowTransformer3DModel'] = Entry(
    init={'patch_size': (1, 2, 2),
         'num_attention_heads': 2,
         'attention_head_dim': 12,
         'in_channels': 4,
         'out_channels': 4,
         'text_dim': 16,
         'freq_dim': 256,
         'ffn_dim': 32,
         'num_layers': 2,
         'cross_attn_norm': True,
         'rope_max_seq_len': 32,
         'gate_value': 0.25,
         'deltatime_type': 'r'},
    inputs={
            'hidden_states': R(1, 2, 4, 16, 16),
            'timestep': T([[500.0, 500.0]], 'float32'),
            'r_timestep': T([[250.0, 250.0]], 'float32'),
            'encoder_hidden_states': R(1, 12, 16),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_anyflow.py::AnyFlowTransformer3DTesterConfig',
)

ZOO['AnyFlowFARTransformer3DModel'] = Entry(
    init={'patch_size': (1, 2, 2),
         'compressed_patch_size': (1, 4, 4),
         'full_chunk_limit': 3,
         'num_attention_heads': 2,
         'attention_head_dim': 12,
         'in_channels': 4,
         'out_channels': 4,
         'text_dim': 16,
         'freq_dim': 256,
         'ffn_dim': 32,
         'num_layers': 2,
         'cross_attn_norm': True,
         'rope_max_seq_len': 32,
         'gate_value': 0.25,
         'deltatime_type': 'r'},
    inputs={
            'hidden_states': R(1, 4, 4, 16, 16),
            'timestep': T([[500.0, 500.0, 500.0, 500.0]], 'float32'),
            'r_timestep': T([[250.0, 250.0, 250.0, 250.0]], 'float32'),
            'encoder_hidden_states': R(1, 12, 16),
            'chunk_partition': [2, 2],
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_anyflow_far.py::AnyFlowFARTransformer3DTesterConfig',
)

ZOO['AuraFlowTransformer2DModel'] = Entry(
    init={'sample_size': 32,
         'patch_size': 2,
         'in_channels': 4,
         'num_mmdit_layers': 1,
         'num_single_dit_layers': 1,
         'attention_head_dim': 8,
         'num_attention_heads': 4,
         'caption_projection_dim': 32,
         'joint_attention_dim': 32,
         'out_channels': 4,
         'pos_embed_max_size': 256},
    inputs={
            'hidden_states': R(1, 4, 32, 32),
            'encoder_hidden_states': R(1, 256, 32),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_aura_flow.py::AuraFlowTransformerTesterConfig',
)

ZOO['BriaTransformer2DModel'] = Entry(
    init={'patch_size': 1,
         'in_channels': 4,
         'num_layers': 1,
         'num_single_layers': 1,
         'attention_head_dim': 8,
         'num_attention_heads': 2,
         'joint_attention_dim': 32,
         'pooled_projection_dim': None,
         'axes_dims_rope': [0, 4, 4]},
    inputs={
            'hidden_states': R(1, 16, 4),
            'encoder_hidden_states': R(1, 48, 32),
            'img_ids': R(16, 3),
            'txt_ids': R(48, 3),
            'timestep': T([1.0], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_bria.py::BriaTransformerTesterConfig',
)

ZOO['BriaFiboTransformer2DModel'] = Entry(
    init={'patch_size': 1,
         'in_channels': 48,
         'num_layers': 1,
         'num_single_layers': 1,
         'attention_head_dim': 8,
         'num_attention_heads': 2,
         'joint_attention_dim': 64,
         'text_encoder_dim': 32,
         'pooled_projection_dim': None,
         'axes_dims_rope': [0, 4, 4]},
    inputs={
            'hidden_states': R(1, 256, 48),
            'encoder_hidden_states': R(1, 32, 64),
            'img_ids': R(256, 3),
            'txt_ids': R(32, 3),
            'timestep': T([1.0], 'float32'),
            'text_encoder_layers': [R(1, 32, 32), R(1, 32, 32)],
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_bria_fibo.py::BriaFiboTransformerTesterConfig',
)

ZOO['ChromaTransformer2DModel'] = Entry(
    init={'patch_size': 1,
         'in_channels': 4,
         'num_layers': 1,
         'num_single_layers': 1,
         'attention_head_dim': 16,
         'num_attention_heads': 2,
         'joint_attention_dim': 32,
         'axes_dims_rope': [4, 4, 8],
         'approximator_num_channels': 8,
         'approximator_hidden_dim': 16,
         'approximator_layers': 1},
    inputs={
            'hidden_states': R(1, 16, 4),
            'encoder_hidden_states': R(1, 48, 32),
            'img_ids': R(16, 3),
            'txt_ids': R(48, 3),
            'timestep': T([1.0], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_chroma.py::ChromaTransformerTesterConfig',
)

ZOO['ChronoEditTransformer3DModel'] = Entry(
    init={'patch_size': (1, 2, 2),
         'num_attention_heads': 2,
         'attention_head_dim': 8,
         'in_channels': 16,
         'out_channels': 16,
         'text_dim': 32,
         'freq_dim': 16,
         'ffn_dim': 32,
         'num_layers': 2,
         'cross_attn_norm': True,
         'qk_norm': 'rms_norm_across_heads',
         'eps': 1e-06,
         'image_dim': None,
         'added_kv_proj_dim': None,
         'rope_max_seq_len': 64,
         'pos_embed_seq_len': None,
         'rope_temporal_skip_len': 8},
    inputs={
            'hidden_states': R(1, 16, 2, 8, 8),
            'timestep': T([44], 'int64'),
            'encoder_hidden_states': R(1, 12, 32),
            'encoder_hidden_states_image': None,
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_chronoedit.py::ChronoEditTransformerTesterConfig',
)

ZOO['CogVideoXTransformer3DModel'] = Entry(
    init={'num_attention_heads': 2,
         'attention_head_dim': 8,
         'in_channels': 4,
         'out_channels': 4,
         'time_embed_dim': 2,
         'text_embed_dim': 8,
         'num_layers': 2,
         'sample_width': 8,
         'sample_height': 8,
         'sample_frames': 8,
         'patch_size': 2,
         'patch_size_t': None,
         'temporal_compression_ratio': 4,
         'max_text_seq_length': 8},
    inputs={
            'hidden_states': R(1, 1, 4, 8, 8),
            'encoder_hidden_states': R(1, 8, 8),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_cogvideox.py::CogVideoXTransformerTesterConfig',
)

ZOO['CogView3PlusTransformer2DModel'] = Entry(
    init={'patch_size': 2,
         'in_channels': 4,
         'num_layers': 2,
         'attention_head_dim': 4,
         'num_attention_heads': 2,
         'out_channels': 4,
         'text_embed_dim': 8,
         'time_embed_dim': 8,
         'condition_dim': 2,
         'pos_embed_max_size': 8,
         'sample_size': 8},
    inputs={
            'hidden_states': R(1, 4, 8, 8),
            'encoder_hidden_states': R(1, 8, 8),
            'original_size': T([[64, 64]], 'int64'),
            'target_size': T([[64, 64]], 'int64'),
            'crop_coords': T([[0, 0]], 'int64'),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_cogview3plus.py::CogView3PlusTransformerTesterConfig',
)

ZOO['CogView4Transformer2DModel'] = Entry(
    init={'patch_size': 2,
         'in_channels': 4,
         'num_layers': 2,
         'attention_head_dim': 4,
         'num_attention_heads': 4,
         'out_channels': 4,
         'text_embed_dim': 8,
         'time_embed_dim': 8,
         'condition_dim': 4},
    inputs={
            'hidden_states': R(1, 4, 8, 8),
            'encoder_hidden_states': R(1, 8, 8),
            'timestep': T([44], 'int64'),
            'original_size': T([[64, 64]], 'int64'),
            'target_size': T([[64, 64]], 'int64'),
            'crop_coords': T([[0, 0]], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_cogview4.py::CogView4TransformerTesterConfig',
)

ZOO['ConsisIDTransformer3DModel'] = Entry(
    init={'num_attention_heads': 2,
         'attention_head_dim': 8,
         'in_channels': 4,
         'out_channels': 4,
         'time_embed_dim': 2,
         'text_embed_dim': 8,
         'num_layers': 1,
         'sample_width': 8,
         'sample_height': 8,
         'sample_frames': 8,
         'patch_size': 2,
         'temporal_compression_ratio': 4,
         'max_text_seq_length': 8,
         'cross_attn_interval': 1,
         'is_kps': False,
         'is_train_face': True,
         'cross_attn_dim_head': 1,
         'cross_attn_num_heads': 1,
         'LFE_id_dim': 2,
         'LFE_vit_dim': 2,
         'LFE_depth': 5,
         'LFE_dim_head': 8,
         'LFE_num_heads': 2,
         'LFE_num_id_token': 1,
         'LFE_num_querie': 1,
         'LFE_output_dim': 10,
         'LFE_ff_mult': 1,
         'LFE_num_scale': 1},
    inputs={
            'hidden_states': R(1, 1, 4, 8, 8),
            'encoder_hidden_states': R(1, 8, 8),
            'timestep': T([44], 'int64'),
            'id_vit_hidden': [T([[[1.0, 1.0], [1.0, 1.0]]], 'float32')],
            'id_cond': T([[1.0, 1.0]], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_consisid.py::ConsisIDTransformerTesterConfig',
)

ZOO['CosmosTransformer3DModel'] = Entry(
    init={'in_channels': 4,
         'out_channels': 4,
         'num_attention_heads': 2,
         'attention_head_dim': 12,
         'num_layers': 2,
         'mlp_ratio': 2,
         'text_embed_dim': 16,
         'adaln_lora_dim': 4,
         'max_size': (4, 32, 32),
         'patch_size': (1, 2, 2),
         'rope_scale': (2.0, 1.0, 1.0),
         'concat_padding_mask': True,
         'extra_pos_embed_type': 'learnable'},
    inputs={
            'hidden_states': R(1, 4, 1, 16, 16),
            'timestep': T([44], 'int64'),
            'encoder_hidden_states': R(1, 12, 16),
            'attention_mask': ones(1, 12),
            'fps': 30,
            'padding_mask': T([[[[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]]], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_cosmos.py::CosmosTransformerTesterConfig',
)

ZOO['Cosmos3OmniTransformer'] = Entry(
    init={'head_dim': 6,
         'hidden_act': 'relu2',
         'hidden_size': 12,
         'intermediate_size': 24,
         'latent_channel': 2,
         'latent_patch_size': 1,
         'num_attention_heads': 2,
         'num_hidden_layers': 2,
         'num_key_value_heads': 1,
         'patch_latent_dim': 2,
         'qk_norm_for_text': False,
         'rms_norm_eps': 1e-05,
         'rope_axes_dim': [1, 1, 1],
         'rope_theta': 100000000.0,
         'vocab_size': 32},
    inputs={
            'input_ids': T([1, 2], 'int64'),
            'text_indexes': T([0, 1], 'int64'),
            'position_ids': T([[0, 0, 0], [0, 0, 0], [0, 0, 0]], 'int64'),
            'und_len': 2,
            'sequence_length': 3,
            'vision_tokens': [R(1, 2, 1, 1, 1)],
            'vision_token_shapes': [(1, 1, 1)],
            'vision_sequence_indexes': T([2], 'int64'),
            'vision_mse_loss_indexes': T([2], 'int64'),
            'vision_timesteps': T([1.0], 'float32'),
            'vision_noisy_frame_indexes': [T([0], 'int64')],
    },
    main='vision_tokens', timestep='vision_timesteps', source='test_models_transformer_cosmos3.py::Cosmos3OmniTransformerTesterConfig',
)

ZOO['EasyAnimateTransformer3DModel'] = Entry(
    init={'attention_head_dim': 16,
         'num_attention_heads': 2,
         'in_channels': 4,
         'mmdit_layers': 2,
         'num_layers': 2,
         'out_channels': 4,
         'patch_size': 2,
         'sample_height': 60,
         'sample_width': 90,
         'text_embed_dim': 16,
         'time_embed_dim': 8,
         'time_position_encoding_type': '3d_rope',
         'timestep_activation_fn': 'silu'},
    inputs={
            'hidden_states': R(1, 4, 2, 16, 16),
            'timestep': T([44], 'int64'),
            'timestep_cond': None,
            'encoder_hidden_states': R(1, 16, 16),
            'encoder_hidden_states_t5': None,
            'inpaint_latents': None,
            'control_latents': None,
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_easyanimate.py::EasyAnimateTransformerTesterConfig',
)

ZOO['ErnieImageTransformer2DModel'] = Entry(
    init={'hidden_size': 16,
         'num_attention_heads': 1,
         'num_layers': 1,
         'ffn_hidden_size': 16,
         'in_channels': 16,
         'out_channels': 16,
         'patch_size': 1,
         'text_in_dim': 16,
         'rope_theta': 256,
         'rope_axes_dim': (8, 4, 4),
         'eps': 1e-06,
         'qk_layernorm': True},
    inputs={
            'hidden_states': R(1, 16, 16, 16),
            'timestep': T([1.0], 'float32'),
            'text_bth': R(1, 16, 16),
            'text_lens': T([16], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_ernie_image.py::ErnieImageTransformerTesterConfig',
)

ZOO['FluxTransformer2DModel'] = Entry(
    init={'patch_size': 1,
         'in_channels': 4,
         'num_layers': 1,
         'num_single_layers': 1,
         'attention_head_dim': 16,
         'num_attention_heads': 2,
         'joint_attention_dim': 32,
         'pooled_projection_dim': 32,
         'axes_dims_rope': [4, 4, 8]},
    inputs={
            'hidden_states': R(1, 16, 4),
            'encoder_hidden_states': R(1, 48, 32),
            'pooled_projections': R(1, 32),
            'img_ids': R(16, 3),
            'txt_ids': R(48, 3),
            'timestep': T([1.0], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_flux.py::FluxTransformerTesterConfig',
)

ZOO['Flux2Transformer2DModel'] = Entry(
    init={'patch_size': 1,
         'in_channels': 4,
         'num_layers': 1,
         'num_single_layers': 1,
         'attention_head_dim': 16,
         'num_attention_heads': 2,
         'joint_attention_dim': 32,
         'timestep_guidance_channels': 256,
         'axes_dims_rope': [4, 4, 4, 4]},
    inputs={
            'hidden_states': R(1, 16, 4),
            'encoder_hidden_states': R(1, 48, 32),
            'img_ids': T([[[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 3, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 2, 0], [0, 1, 3, 0], [0, 2, 0, 0], [0, 2, 1, 0], [0, 2, 2, 0], [0, 2, 3, 0], [0, 3, 0, 0], [0, 3, 1, 0], [0, 3, 2, 0], [0, 3, 3, 0]]], 'int64'),
            'txt_ids': T([[[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 3], [0, 0, 0, 4], [0, 0, 0, 5], [0, 0, 0, 6], [0, 0, 0, 7], [0, 0, 0, 8], [0, 0, 0, 9], [0, 0, 0, 10], [0, 0, 0, 11], [0, 0, 0, 12], [0, 0, 0, 13], [0, 0, 0, 14], [0, 0, 0, 15], [0, 0, 0, 16], [0, 0, 0, 17], [0, 0, 0, 18], [0, 0, 0, 19], [0, 0, 0, 20], [0, 0, 0, 21], [0, 0, 0, 22], [0, 0, 0, 23], [0, 0, 0, 24], [0, 0, 0, 25], [0, 0, 0, 26], [0, 0, 0, 27], [0, 0, 0, 28], [0, 0, 0, 29], [0, 0, 0, 30], [0, 0, 0, 31], [0, 0, 0, 32], [0, 0, 0, 33], [0, 0, 0, 34], [0, 0, 0, 35], [0, 0, 0, 36], [0, 0, 0, 37], [0, 0, 0, 38], [0, 0, 0, 39], [0, 0, 0, 40], [0, 0, 0, 41], [0, 0, 0, 42], [0, 0, 0, 43], [0, 0, 0, 44], [0, 0, 0, 45], [0, 0, 0, 46], [0, 0, 0, 47]]], 'int64'),
            'timestep': T([1.0], 'float32'),
            'guidance': T([1.0], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_flux2.py::Flux2TransformerTesterConfig',
)

ZOO['GlmImageTransformer2DModel'] = Entry(
    init={'patch_size': 2,
         'in_channels': 4,
         'out_channels': 4,
         'num_layers': 1,
         'attention_head_dim': 8,
         'num_attention_heads': 2,
         'text_embed_dim': 32,
         'time_embed_dim': 16,
         'condition_dim': 8,
         'prior_vq_quantizer_codebook_size': 64},
    inputs={
            'hidden_states': R(1, 4, 8, 8),
            'encoder_hidden_states': R(1, 12, 32),
            'prior_token_id': T([44], 'int64'),
            'prior_token_drop': T([False], 'bool'),
            'timestep': T([44], 'int64'),
            'target_size': T([[8.0, 8.0]], 'float32'),
            'crop_coords': T([[0.0, 0.0]], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_glm_image.py::GlmImageTransformerTesterConfig',
)

ZOO['HeliosTransformer3DModel'] = Entry(
    init={'patch_size': (1, 2, 2),
         'num_attention_heads': 2,
         'attention_head_dim': 12,
         'in_channels': 4,
         'out_channels': 4,
         'text_dim': 16,
         'freq_dim': 256,
         'ffn_dim': 32,
         'num_layers': 2,
         'cross_attn_norm': True,
         'qk_norm': 'rms_norm_across_heads',
         'rope_dim': (4, 4, 4),
         'has_multi_term_memory_patch': True,
         'guidance_cross_attn': True,
         'zero_history_timestep': True,
         'is_amplify_history': False},
    inputs={
            'hidden_states': R(1, 4, 2, 16, 16),
            'timestep': T([44], 'int64'),
            'encoder_hidden_states': R(1, 12, 16),
            'indices_hidden_states': T([[1.0, 1.0]], 'float32'),
            'indices_latents_history_short': T([[1.0]], 'float32'),
            'indices_latents_history_mid': T([[1.0]], 'float32'),
            'indices_latents_history_long': T([[1.0, 1.0, 1.0, 1.0]], 'float32'),
            'latents_history_short': R(1, 4, 1, 16, 16),
            'latents_history_mid': R(1, 4, 1, 16, 16),
            'latents_history_long': R(1, 4, 4, 16, 16),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_helios.py::HeliosTransformer3DTesterConfig',
)

ZOO['HiDreamImageTransformer2DModel'] = Entry(
    init={'patch_size': 2,
         'in_channels': 4,
         'out_channels': 4,
         'num_layers': 1,
         'num_single_layers': 1,
         'attention_head_dim': 8,
         'num_attention_heads': 4,
         'caption_channels': [8, 4],
         'text_emb_dim': 8,
         'num_routed_experts': 2,
         'num_activated_experts': 2,
         'axes_dims_rope': (4, 2, 2),
         'max_resolution': (32, 32),
         'llama_layers': (0, 1),
         'force_inference_output': True},
    inputs={
            'hidden_states': R(2, 4, 32, 32),
            'encoder_hidden_states_t5': R(2, 8, 8),
            'encoder_hidden_states_llama3': R(2, 2, 8, 4),
            'pooled_embeds': R(2, 8),
            'timesteps': T([44, 239], 'int64'),
    },
    main='hidden_states', timestep='timesteps', source='test_models_transformer_hidream.py::HiDreamTransformerTesterConfig',
)

ZOO['HunyuanVideo15Transformer3DModel'] = Entry(
    init={'in_channels': 4,
         'out_channels': 4,
         'num_attention_heads': 2,
         'attention_head_dim': 8,
         'num_layers': 2,
         'num_refiner_layers': 1,
         'mlp_ratio': 2.0,
         'patch_size': 1,
         'patch_size_t': 1,
         'text_embed_dim': 16,
         'text_embed_2_dim': 8,
         'image_embed_dim': 12,
         'rope_axes_dim': (2, 2, 4),
         'target_size': 16,
         'task_type': 't2v'},
    inputs={
            'hidden_states': R(1, 4, 1, 8, 8),
            'timestep': T([1.0], 'float32'),
            'encoder_hidden_states': R(1, 6, 16),
            'encoder_hidden_states_2': R(1, 4, 8),
            'encoder_attention_mask': T([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], 'float32'),
            'encoder_attention_mask_2': T([[1.0, 1.0, 1.0, 1.0]], 'float32'),
            'image_embeds': T([[[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_hunyuan_1_5.py::HunyuanVideo15TransformerTesterConfig',
)

ZOO['HunyuanDiT2DModel'] = Entry(
    init={'sample_size': 8,
         'patch_size': 2,
         'in_channels': 4,
         'num_layers': 1,
         'attention_head_dim': 8,
         'num_attention_heads': 2,
         'cross_attention_dim': 8,
         'cross_attention_dim_t5': 8,
         'pooled_projection_dim': 4,
         'hidden_size': 16,
         'text_len': 4,
         'text_len_t5': 4,
         'activation_fn': 'gelu-approximate'},
    inputs={
            'hidden_states': R(1, 4, 8, 8),
            'encoder_hidden_states': R(1, 4, 8),
            'text_embedding_mask': T([[1.0, 1.0, 1.0, 1.0]], 'float32'),
            'encoder_hidden_states_t5': R(1, 4, 8),
            'text_embedding_mask_t5': T([[1.0, 1.0, 1.0, 1.0]], 'float32'),
            'timestep': T([44.0], 'float32'),
            'image_meta_size': T([[1024.0, 1024.0, 16.0, 16.0, 0.0, 0.0]], 'float32'),
            'style': T([0], 'int64'),
            'image_rotary_emb': [T([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], 'float32'), T([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], 'float32')],
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_hunyuan_dit.py::HunyuanDiTTesterConfig', extra=True,
)

ZOO['HunyuanVideoTransformer3DModel'] = Entry(
    init={'in_channels': 4,
         'out_channels': 4,
         'num_attention_heads': 2,
         'attention_head_dim': 10,
         'num_layers': 1,
         'num_single_layers': 1,
         'num_refiner_layers': 1,
         'patch_size': 1,
         'patch_size_t': 1,
         'guidance_embeds': True,
         'text_embed_dim': 16,
         'pooled_projection_dim': 8,
         'rope_axes_dim': (2, 4, 4),
         'image_condition_type': None},
    inputs={
            'hidden_states': R(1, 4, 1, 16, 16),
            'timestep': T([44.0], 'float32'),
            'encoder_hidden_states': R(1, 12, 16),
            'pooled_projections': T([[1.5409960746765137, -0.293428897857666, -2.1787893772125244, 0.5684312582015991, -1.0845223665237427, -1.3985954523086548, 0.40334683656692505, 0.8380263447761536]], 'float32'),
            'encoder_attention_mask': ones(1, 12),
            'guidance': T([44.0], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_hunyuan_video.py::HunyuanVideoTransformerTesterConfig',
)

ZOO['HunyuanVideoFramepackTransformer3DModel'] = Entry(
    init={'in_channels': 4,
         'out_channels': 4,
         'num_attention_heads': 2,
         'attention_head_dim': 10,
         'num_layers': 1,
         'num_single_layers': 1,
         'num_refiner_layers': 1,
         'patch_size': 2,
         'patch_size_t': 1,
         'guidance_embeds': True,
         'text_embed_dim': 16,
         'pooled_projection_dim': 8,
         'rope_axes_dim': (2, 4, 4),
         'image_condition_type': None,
         'has_image_proj': True,
         'image_proj_dim': 16,
         'has_clean_x_embedder': True},
    inputs={
            'hidden_states': R(1, 4, 3, 4, 4),
            'timestep': T([44], 'int64'),
            'encoder_hidden_states': R(1, 12, 16),
            'pooled_projections': T([[1.5409960746765137, -0.293428897857666, -2.1787893772125244, 0.5684312582015991, -1.0845223665237427, -1.3985954523086548, 0.40334683656692505, 0.8380263447761536]], 'float32'),
            'encoder_attention_mask': ones(1, 12),
            'guidance': T([44], 'int64'),
            'image_embeds': R(1, 12, 16),
            'indices_latents': T([1.0, 1.0, 1.0], 'float32'),
            'latents_clean': R(1, 4, 2, 4, 4),
            'indices_latents_clean': T([1.0, 1.0], 'float32'),
            'latents_history_2x': R(1, 4, 2, 4, 4),
            'indices_latents_history_2x': T([1.0, 1.0], 'float32'),
            'latents_history_4x': R(1, 4, 8, 4, 4),
            'indices_latents_history_4x': T([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_hunyuan_video_framepack.py::HunyuanVideoFramepackTransformerTesterConfig',
)

ZOO['Ideogram4Transformer2DModel'] = Entry(
    init={'in_channels': 16,
         'num_layers': 2,
         'attention_head_dim': 8,
         'num_attention_heads': 4,
         'intermediate_size': 32,
         'adaln_dim': 16,
         'llm_features_dim': 24,
         'rope_theta': 10000,
         'mrope_section': (2, 1, 1),
         'norm_eps': 1e-05},
    inputs={
            'hidden_states': R(1, 8, 16),
            'encoder_hidden_states': R(1, 8, 24),
            'timestep': T([0.5], 'float32'),
            'position_ids': T([[[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3], [65536, 65536, 65536], [65536, 65536, 65537], [65536, 65537, 65536], [65536, 65537, 65537]]], 'int64'),
            'segment_ids': T([[1, 1, 1, 1, 1, 1, 1, 1]], 'int64'),
            'indicator': T([[3, 3, 3, 3, 2, 2, 2, 2]], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_ideogram4.py::Ideogram4TransformerTesterConfig',
)

ZOO['JoyImageEditTransformer3DModel'] = Entry(
    init={'patch_size': [1, 2, 2],
         'in_channels': 16,
         'hidden_size': 32,
         'num_attention_heads': 2,
         'text_dim': 16,
         'num_layers': 2,
         'rope_dim_list': [4, 6, 6],
         'theta': 256},
    inputs={
            'hidden_states': R(1, 16, 1, 4, 4),
            'encoder_hidden_states': R(1, 12, 16),
            'timestep': T([1.0], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_joyimage.py::JoyImageEditTransformerTesterConfig',
)

ZOO['JoyImageEditPlusTransformer3DModel'] = Entry(
    init={'patch_size': [1, 2, 2],
         'in_channels': 16,
         'hidden_size': 32,
         'num_attention_heads': 2,
         'text_dim': 16,
         'num_layers': 2,
         'rope_dim_list': [4, 6, 6],
         'theta': 256},
    inputs={
            'hidden_states': R(1, 2, 16, 1, 2, 2),
            'encoder_hidden_states': R(1, 12, 16),
            'timestep': T([1.0], 'float32'),
            'shape_list': [[(1, 1, 1), (1, 1, 1)]],
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_joyimage_edit_plus.py::JoyImageEditPlusTransformerTesterConfig',
)

ZOO['Krea2Transformer2DModel'] = Entry(
    init={'in_channels': 16,
         'num_layers': 2,
         'attention_head_dim': 8,
         'num_attention_heads': 4,
         'num_key_value_heads': 2,
         'intermediate_size': 32,
         'timestep_embed_dim': 8,
         'text_hidden_dim': 16,
         'num_text_layers': 3,
         'text_num_attention_heads': 2,
         'text_num_key_value_heads': 1,
         'text_intermediate_size': 16,
         'num_layerwise_text_blocks': 1,
         'num_refiner_text_blocks': 1,
         'axes_dims_rope': (4, 2, 2),
         'rope_theta': 1000.0,
         'norm_eps': 1e-05},
    inputs={
            'hidden_states': R(1, 4, 16),
            'encoder_hidden_states': R(1, 4, 3, 16),
            'timestep': T([0.5], 'float32'),
            'position_ids': T([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1.0]], 'float32'),
            'encoder_attention_mask': T([[True, True, True, False]], 'bool'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_krea2.py::Krea2TransformerTesterConfig',
)

ZOO['LatteTransformer3DModel'] = Entry(
    init={'sample_size': 8,
         'num_layers': 1,
         'patch_size': 2,
         'attention_head_dim': 4,
         'num_attention_heads': 2,
         'caption_channels': 8,
         'in_channels': 4,
         'cross_attention_dim': 8,
         'out_channels': 8,
         'attention_bias': True,
         'activation_fn': 'gelu-approximate',
         'num_embeds_ada_norm': 1000,
         'norm_type': 'ada_norm_single',
         'norm_elementwise_affine': False,
         'norm_eps': 1e-06},
    inputs={
            'hidden_states': R(1, 4, 1, 8, 8),
            'encoder_hidden_states': R(1, 8, 8),
            'timestep': T([44], 'int64'),
            'enable_temporal_attentions': True,
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_latte.py::LatteTransformerTesterConfig',
)

ZOO['LongCatAudioDiTTransformer'] = Entry(
    init={'dit_dim': 64,
         'dit_depth': 2,
         'dit_heads': 4,
         'dit_text_dim': 32,
         'latent_dim': 8,
         'text_conv': False},
    inputs={
            'hidden_states': R(1, 16, 8),
            'encoder_hidden_states': R(1, 10, 32),
            'encoder_attention_mask': T([[True, True, True, True, True, True, True, True, True, True]], 'bool'),
            'attention_mask': T([[True, True, True, True, True, True, True, True, True, True, True, True, True, True, True, True]], 'bool'),
            'timestep': T([1.0], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_longcat_audio_dit.py::LongCatAudioDiTTransformerTesterConfig',
)

ZOO['LongCatImageTransformer2DModel'] = Entry(
    init={'patch_size': 1,
         'in_channels': 4,
         'num_layers': 1,
         'num_single_layers': 1,
         'attention_head_dim': 16,
         'num_attention_heads': 2,
         'joint_attention_dim': 32,
         'pooled_projection_dim': 32,
         'axes_dims_rope': [4, 4, 8]},
    inputs={
            'hidden_states': R(1, 16, 4),
            'encoder_hidden_states': R(1, 48, 32),
            'img_ids': R(16, 3),
            'txt_ids': R(48, 3),
            'timestep': T([1.0], 'float32'),
            'guidance': T([3.5], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_longcat_image.py::LongCatImageTransformerTesterConfig',
)

ZOO['LTXVideoTransformer3DModel'] = Entry(
    init={'in_channels': 4,
         'out_channels': 4,
         'num_attention_heads': 2,
         'attention_head_dim': 8,
         'cross_attention_dim': 16,
         'num_layers': 1,
         'qk_norm': 'rms_norm_across_heads',
         'caption_channels': 16},
    inputs={
            'hidden_states': R(2, 512, 4),
            'encoder_hidden_states': R(2, 16, 16),
            'timestep': T([44, 239], 'int64'),
            'encoder_attention_mask': T([[True, True, True, True, True, True, True, True, True, True, True, True, True, True, True, True], [True, True, True, True, True, True, True, True, True, True, True, True, True, True, True, True]], 'bool'),
            'num_frames': 2,
            'height': 16,
            'width': 16,
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_ltx.py::LTXTransformerTesterConfig',
)

ZOO['LTX2VideoTransformer3DModel'] = Entry(
    init={'in_channels': 4,
         'out_channels': 4,
         'patch_size': 1,
         'patch_size_t': 1,
         'num_attention_heads': 2,
         'attention_head_dim': 8,
         'cross_attention_dim': 16,
         'audio_in_channels': 4,
         'audio_out_channels': 4,
         'audio_num_attention_heads': 2,
         'audio_attention_head_dim': 4,
         'audio_cross_attention_dim': 8,
         'num_layers': 2,
         'qk_norm': 'rms_norm_across_heads',
         'caption_channels': 16,
         'rope_double_precision': False},
    inputs={
            'hidden_states': R(2, 512, 4),
            'audio_hidden_states': R(2, 9, 4),
            'encoder_hidden_states': R(2, 16, 16),
            'audio_encoder_hidden_states': R(2, 16, 16),
            'timestep': T([1540.99609375, 293.42889404296875], 'float32'),
            'encoder_attention_mask': T([[True, True, True, True, True, True, True, True, True, True, True, True, True, True, True, True], [True, True, True, True, True, True, True, True, True, True, True, True, True, True, True, True]], 'bool'),
            'num_frames': 2,
            'height': 16,
            'width': 16,
            'audio_num_frames': 9,
            'fps': 25.0,
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_ltx2.py::LTX2TransformerTesterConfig',
)

ZOO['LuminaNextDiT2DModel'] = Entry(
    init={'sample_size': 16,
         'patch_size': 2,
         'in_channels': 4,
         'hidden_size': 24,
         'num_layers': 2,
         'num_attention_heads': 3,
         'num_kv_heads': 1,
         'multiple_of': 16,
         'ffn_dim_multiplier': None,
         'norm_eps': 1e-05,
         'learn_sigma': False,
         'qk_norm': True,
         'cross_attention_dim': 32,
         'scaling_factor': 1.0},
    inputs={
            'hidden_states': R(1, 4, 16, 16),
            'encoder_hidden_states': R(1, 16, 32),
            'timestep': T([0.49625658988952637], 'float32'),
            'encoder_mask': R(1, 16),
            'image_rotary_emb': R(384, 384, 4),
            'cross_attention_kwargs': {},
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_lumina.py::LuminaNextDiTTesterConfig', extra=True,
)

ZOO['Lumina2Transformer2DModel'] = Entry(
    init={'sample_size': 16,
         'patch_size': 2,
         'in_channels': 4,
         'hidden_size': 24,
         'num_layers': 2,
         'num_refiner_layers': 1,
         'num_attention_heads': 3,
         'num_kv_heads': 1,
         'multiple_of': 2,
         'ffn_dim_multiplier': None,
         'norm_eps': 1e-05,
         'scaling_factor': 1.0,
         'axes_dim_rope': (4, 2, 2),
         'axes_lens': (128, 128, 128),
         'cap_feat_dim': 32},
    inputs={
            'hidden_states': R(1, 4, 16, 16),
            'encoder_hidden_states': R(1, 16, 32),
            'timestep': T([0.49625658988952637], 'float32'),
            'encoder_attention_mask': T([[True, True, True, True, True, True, True, True, True, True, True, True, True, True, True, True]], 'bool'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_lumina2.py::Lumina2TransformerTesterConfig',
)

ZOO['MiniMaxH3Transformer3DModel'] = Entry(
    init={'num_attention_heads': 2,
         'attention_head_dim': 16,
         'hidden_size': 24,
         'num_layers': 2,
         'num_refiner_layers': 2,
         'ffn_dim': 32,
         'in_channels': 4,
         'audio_in_channels': 6,
         'patch_size': (1, 2, 2),
         'text_dim': 8,
         'freq_dim': 8,
         'time_embed_hidden_dim': 24,
         'time_embed_dim': 16,
         'rope_freq_dim': 2},
    inputs={
            'hidden_states': R(1, 8, 16),
            'audio_hidden_states': R(1, 6, 6),
            'encoder_hidden_states': R(1, 4, 8),
            'timestep': T([0.699999988079071, 0.30000001192092896], 'float32'),
            'timestep_indices': T([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], 'int64'),
            'token_tags': T([1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0], 'int64'),
            'position_ids': T([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [4.0, 0.0, 0.0], [5.0, 0.0, 0.0], [6.0, 0.0, 0.0], [7.0, 0.0, 0.0], [8.0, 0.0, 0.0], [9.0, 0.0, 0.0], [10.0, 0.0, 0.0], [11.0, 1.0, 1.0], [12.0, 2.0, 0.0], [13.0, 3.0, 1.0], [14.0, 0.0, 0.0], [15.0, 1.0, 1.0], [16.0, 2.0, 0.0], [17.0, 3.0, 1.0]], 'float32'),
            'video_indices': T([10, 11, 12, 13, 14, 15, 16, 17], 'int64'),
            'audio_indices': T([4, 5, 6, 7, 8, 9], 'int64'),
            'text_indices': T([0, 1, 2, 3], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_minimax_h3.py::MiniMaxH3TransformerTesterConfig',
)

ZOO['MiniMaxMusic3Transformer1DModel'] = Entry(
    init={'in_channels': 8,
         'condition_dim': 16,
         'num_layers': 2,
         'num_attention_heads': 2,
         'attention_head_dim': 8,
         'ff_inner_dim': 32,
         'rotary_dim': 4,
         'fourier_embedding_dim': 8},
    inputs={
            'hidden_states': R(1, 8, 24),
            'encoder_hidden_states': R(1, 24, 16),
            'timestep': T([0.5], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_minimax_music3.py::MiniMaxMusic3Transformer1DTesterConfig',
)

ZOO['MochiTransformer3DModel'] = Entry(
    init={'patch_size': 2,
         'num_attention_heads': 2,
         'attention_head_dim': 8,
         'num_layers': 2,
         'pooled_projection_dim': 16,
         'in_channels': 4,
         'out_channels': None,
         'qk_norm': 'rms_norm',
         'text_embed_dim': 16,
         'time_embed_dim': 4,
         'activation_fn': 'swiglu',
         'max_sequence_length': 16},
    inputs={
            'hidden_states': R(1, 4, 2, 16, 16),
            'encoder_hidden_states': R(1, 16, 16),
            'timestep': T([44], 'int64'),
            'encoder_attention_mask': T([[True, True, True, True, True, True, True, True, True, True, True, True, True, True, True, True]], 'bool'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_mochi.py::MochiTransformerTesterConfig',
)

ZOO['MotifVideoTransformer3DModel'] = Entry(
    init={'in_channels': 33,
         'out_channels': 16,
         'num_attention_heads': 2,
         'attention_head_dim': 12,
         'num_layers': 1,
         'num_single_layers': 1,
         'num_decoder_layers': 0,
         'mlp_ratio': 4.0,
         'patch_size': 1,
         'patch_size_t': 1,
         'qk_norm': 'rms_norm',
         'norm_type': 'layer_norm',
         'text_embed_dim': 32,
         'image_embed_dim': 4,
         'rope_theta': 256.0,
         'rope_axes_dim': (4, 4, 4),
         'enable_text_cross_attention_dual': False,
         'enable_text_cross_attention_single': False},
    inputs={
            'hidden_states': R(1, 33, 9, 16, 16),
            'encoder_hidden_states': R(1, 12, 32),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_motif_video.py::MotifVideoTransformerTesterConfig',
)

ZOO['NucleusMoEImageTransformer2DModel'] = Entry(
    init={'patch_size': 2,
         'in_channels': 16,
         'out_channels': 4,
         'num_layers': 2,
         'attention_head_dim': 16,
         'num_attention_heads': 4,
         'joint_attention_dim': 16,
         'axes_dims_rope': (8, 4, 4),
         'moe_enabled': False,
         'capacity_factors': [8.0, 8.0]},
    inputs={
            'hidden_states': R(1, 16, 16),
            'encoder_hidden_states': R(1, 8, 16),
            'encoder_hidden_states_mask': T([[1, 1, 1, 1, 1, 1, 1, 1]], 'int64'),
            'timestep': T([1.0], 'float32'),
            'img_shapes': [(1, 4, 4)],
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_nucleusmoe_image.py::NucleusMoEImageTransformerTesterConfig',
)

ZOO['OmniGenTransformer2DModel'] = Entry(
    init={'hidden_size': 16,
         'num_attention_heads': 4,
         'num_key_value_heads': 4,
         'intermediate_size': 32,
         'num_layers': 20,
         'pad_token_id': 0,
         'vocab_size': 1000,
         'in_channels': 4,
         'time_step_dim': 4,
         'rope_scaling': {'long_factor': [1, 2], 'short_factor': [1, 2]}},
    inputs={
            'hidden_states': R(1, 4, 8, 8),
            'timestep': T([0.49625658988952637], 'float32'),
            'input_ids': T([[4, 9, 3, 0, 3, 9, 7, 3, 7, 3, 1, 6, 6, 9, 8, 6, 6, 8, 4, 3, 6, 9, 1, 4]], 'int64'),
            'input_img_latents': [R(1, 4, 8, 8)],
            'input_image_sizes': {0: [[0, 16]]},
            'attention_mask': ones(1, 41, 41),
            'position_ids': T([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_omnigen.py::OmniGenTransformerTesterConfig',
)

ZOO['OvisImageTransformer2DModel'] = Entry(
    init={'patch_size': 1,
         'in_channels': 4,
         'out_channels': 4,
         'num_layers': 1,
         'num_single_layers': 1,
         'attention_head_dim': 16,
         'num_attention_heads': 2,
         'joint_attention_dim': 32,
         'axes_dims_rope': (4, 4, 8)},
    inputs={
            'hidden_states': R(1, 16, 4),
            'encoder_hidden_states': R(1, 48, 32),
            'img_ids': R(16, 3),
            'txt_ids': R(48, 3),
            'timestep': T([1.0], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_ovis_image.py::OvisImageTransformerTesterConfig',
)

ZOO['PRXTransformer2DModel'] = Entry(
    init={'in_channels': 16,
         'patch_size': 2,
         'context_in_dim': 64,
         'hidden_size': 64,
         'mlp_ratio': 3.5,
         'num_heads': 2,
         'depth': 2,
         'axes_dim': [16, 16],
         'theta': 10000},
    inputs={
            'hidden_states': R(1, 16, 16, 16),
            'encoder_hidden_states': R(1, 16, 64),
            'timestep': T([1.0], 'float32'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_prx.py::PRXTransformerTesterConfig',
)

ZOO['QwenImageTransformer2DModel'] = Entry(
    init={'patch_size': 2,
         'in_channels': 16,
         'out_channels': 4,
         'num_layers': 2,
         'attention_head_dim': 16,
         'num_attention_heads': 4,
         'joint_attention_dim': 16,
         'guidance_embeds': False,
         'axes_dims_rope': (8, 4, 4)},
    inputs={
            'hidden_states': R(1, 16, 16),
            'encoder_hidden_states': R(1, 8, 16),
            'encoder_hidden_states_mask': T([[1, 1, 1, 1, 1, 1, 1, 1]], 'int64'),
            'timestep': T([1.0], 'float32'),
            'img_shapes': [(1, 4, 4)],
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_qwenimage.py::QwenImageTransformerTesterConfig',
)

ZOO['SanaTransformer2DModel'] = Entry(
    init={'patch_size': 1,
         'in_channels': 4,
         'out_channels': 4,
         'num_layers': 1,
         'attention_head_dim': 4,
         'num_attention_heads': 2,
         'num_cross_attention_heads': 2,
         'cross_attention_head_dim': 4,
         'cross_attention_dim': 8,
         'caption_channels': 8,
         'sample_size': 32},
    inputs={
            'hidden_states': R(2, 4, 32, 32),
            'encoder_hidden_states': R(2, 8, 8),
            'timestep': T([44, 239], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_sana.py::SanaTransformerTesterConfig',
)

ZOO['SanaVideoTransformer3DModel'] = Entry(
    init={'in_channels': 16,
         'out_channels': 16,
         'num_attention_heads': 2,
         'attention_head_dim': 12,
         'num_layers': 2,
         'num_cross_attention_heads': 2,
         'cross_attention_head_dim': 12,
         'cross_attention_dim': 24,
         'caption_channels': 16,
         'mlp_ratio': 2.5,
         'dropout': 0.0,
         'attention_bias': False,
         'sample_size': 8,
         'patch_size': (1, 2, 2),
         'norm_elementwise_affine': False,
         'norm_eps': 1e-06,
         'qk_norm': 'rms_norm_across_heads',
         'rope_max_seq_len': 32},
    inputs={
            'hidden_states': R(1, 16, 2, 16, 16),
            'encoder_hidden_states': R(1, 12, 16),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_sana_video.py::SanaVideoTransformer3DTesterConfig',
)

ZOO['SD3Transformer2DModel'] = Entry(
    init={'sample_size': 32,
         'patch_size': 1,
         'in_channels': 4,
         'num_layers': 4,
         'attention_head_dim': 8,
         'num_attention_heads': 4,
         'caption_projection_dim': 32,
         'joint_attention_dim': 32,
         'pooled_projection_dim': 64,
         'out_channels': 4,
         'pos_embed_max_size': 96,
         'dual_attention_layers': (),
         'qk_norm': None},
    inputs={
            'hidden_states': R(1, 4, 32, 32),
            'encoder_hidden_states': R(1, 154, 32),
            'pooled_projections': R(1, 64),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_sd3.py::SD3TransformerTesterConfig',
)

ZOO['SkyReelsV2Transformer3DModel'] = Entry(
    init={'patch_size': (1, 2, 2),
         'num_attention_heads': 2,
         'attention_head_dim': 12,
         'in_channels': 4,
         'out_channels': 4,
         'text_dim': 16,
         'freq_dim': 256,
         'ffn_dim': 32,
         'num_layers': 2,
         'cross_attn_norm': True,
         'qk_norm': 'rms_norm_across_heads',
         'rope_max_seq_len': 32},
    inputs={
            'hidden_states': R(1, 4, 2, 16, 16),
            'encoder_hidden_states': R(1, 12, 16),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_skyreels_v2.py::SkyReelsV2TransformerTesterConfig',
)

ZOO['StableAudio3DiTModel'] = Entry(
    init={'io_channels': 8,
         'patch_size': 1,
         'embed_dim': 32,
         'depth': 2,
         'num_heads': 4,
         'cond_token_dim': 16,
         'global_cond_dim': 12,
         'local_add_cond_dim': 5,
         'timestep_features_dim': 16,
         'ff_mult': 2,
         'num_memory_tokens': 3,
         'use_differential_attention': False},
    inputs={
            'hidden_states': R(2, 8, 16),
            'timestep': T([0.00442582368850708, 0.7256969809532166], 'float32'),
            'encoder_hidden_states': R(2, 4, 16),
            'global_hidden_states': R(2, 12),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_stable_audio3.py::StableAudio3DiTTesterConfig', extra=True,
)

ZOO['TransformerTemporalModel'] = Entry(
    init={'num_attention_heads': 8,
         'attention_head_dim': 4,
         'in_channels': 4,
         'num_layers': 1,
         'norm_num_groups': 1},
    inputs={
            'hidden_states': R(1, 4, 32, 32),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_temporal.py::TemporalTransformerTesterConfig',
)

ZOO['WanTransformer3DModel'] = Entry(
    init={'patch_size': (1, 2, 2),
         'num_attention_heads': 2,
         'attention_head_dim': 12,
         'in_channels': 4,
         'out_channels': 4,
         'text_dim': 16,
         'freq_dim': 256,
         'ffn_dim': 32,
         'num_layers': 2,
         'cross_attn_norm': True,
         'qk_norm': 'rms_norm_across_heads',
         'rope_max_seq_len': 32},
    inputs={
            'hidden_states': R(1, 4, 2, 16, 16),
            'encoder_hidden_states': R(1, 12, 16),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_wan.py::WanTransformer3DTesterConfig',
)

ZOO['WanAnimateTransformer3DModel'] = Entry(
    init={'patch_size': (1, 2, 2),
         'num_attention_heads': 2,
         'attention_head_dim': 12,
         'in_channels': 12,
         'latent_channels': 4,
         'out_channels': 4,
         'text_dim': 16,
         'freq_dim': 256,
         'ffn_dim': 32,
         'num_layers': 2,
         'cross_attn_norm': True,
         'qk_norm': 'rms_norm_across_heads',
         'image_dim': 16,
         'rope_max_seq_len': 32,
         'motion_encoder_channel_sizes': {'4': 16, '8': 16, '16': 16},
         'motion_encoder_size': 16,
         'motion_style_dim': 8,
         'motion_dim': 4,
         'motion_encoder_dim': 16,
         'face_encoder_hidden_dim': 16,
         'face_encoder_num_heads': 2,
         'inject_face_latents_blocks': 2},
    inputs={
            'hidden_states': R(1, 12, 21, 16, 16),
            'timestep': T([44], 'int64'),
            'encoder_hidden_states': R(1, 12, 16),
            'encoder_hidden_states_image': R(1, 12, 16),
            'pose_hidden_states': R(1, 4, 20, 16, 16),
            'face_pixel_values': R(1, 3, 77, 16, 16),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_wan_animate.py::WanAnimateTransformer3DTesterConfig',
)

ZOO['WanAnimate2Transformer3DModel'] = Entry(
    init={'patch_size': (1, 2, 2),
         'text_len': 16,
         'in_dim': 36,
         'dim': 128,
         'ffn_dim': 256,
         'freq_dim': 64,
         'text_dim': 32,
         'out_dim': 16,
         'num_heads': 4,
         'num_layers': 2,
         'cross_attn_norm': True,
         'use_img_emb': True},
    inputs={
            'hidden_states': [R(16, 2, 4, 4)],
            'timestep': T([1.0], 'float32'),
            'encoder_hidden_states': [R(8, 32)],
            'condition_latents': [R(20, 2, 4, 4)],
            'encoder_hidden_states_image': R(1, 4, 1280),
            'kv_cache': F('diffusers.models.transformers.transformer_wan_animate_2.WanAnimate2KVCache'),
            'kv_cache_mode': 'extract',
            'seq_len': 8,
            'offset_grid_sizes': T([[2, 2, 2]], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_wan_animate_2.py::WanAnimate2TransformerTesterConfig',
)

ZOO['WanVACETransformer3DModel'] = Entry(
    init={'patch_size': (1, 2, 2),
         'num_attention_heads': 2,
         'attention_head_dim': 12,
         'in_channels': 16,
         'out_channels': 16,
         'text_dim': 32,
         'freq_dim': 256,
         'ffn_dim': 32,
         'num_layers': 4,
         'cross_attn_norm': True,
         'qk_norm': 'rms_norm_across_heads',
         'rope_max_seq_len': 32,
         'vace_layers': [0, 2],
         'vace_in_channels': 48},
    inputs={
            'hidden_states': R(1, 16, 2, 16, 16),
            'encoder_hidden_states': R(1, 12, 32),
            'control_hidden_states': R(1, 48, 2, 16, 16),
            'timestep': T([44], 'int64'),
    },
    main='hidden_states', timestep='timestep', source='test_models_transformer_wan_vace.py::WanVACETransformer3DTesterConfig',
)

ZOO['ZImageTransformer2DModel'] = Entry(
    init={'all_patch_size': (2,),
         'all_f_patch_size': (1,),
         'in_channels': 16,
         'dim': 16,
         'n_layers': 1,
         'n_refiner_layers': 1,
         'n_heads': 1,
         'n_kv_heads': 2,
         'qk_norm': True,
         'cap_feat_dim': 16,
         'rope_theta': 256.0,
         't_scale': 1000.0,
         'axes_dims': [8, 4, 4],
         'axes_lens': [256, 32, 32]},
    inputs={
            'x': [R(16, 1, 16, 16)],
            'cap_feats': [R(16, 16)],
            't': T([0.0], 'float32'),
    },
    main='x', timestep='t', source='test_models_transformer_z_image.py::ZImageTransformerTesterConfig',
)


def _make(spec, gen: torch.Generator):
    if isinstance(spec, T) and spec.shape is not None:
        return torch.tensor(spec.values, dtype=getattr(torch, spec.dtype)).expand(spec.shape).clone()
    if isinstance(spec, R):
        return torch.randn(spec.shape, generator=gen)
    if isinstance(spec, T):
        return torch.tensor(spec.values, dtype=getattr(torch, spec.dtype))
    if isinstance(spec, F):
        mod, _, cls = spec.path.rpartition(".")
        return _factory(getattr(importlib.import_module(mod), cls))
    if isinstance(spec, dict):
        return {k: _make(v, gen) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_make(v, gen) for v in spec]
    if isinstance(spec, tuple):
        return tuple(_make(v, gen) for v in spec)
    return spec


def _factory(cls):
    import inspect

    params = [p for p in inspect.signature(cls).parameters.values() if p.default is inspect.Parameter.empty]
    return cls(*[_NUM_LAYERS] * len(params))


_NUM_LAYERS = 2  # the only factory-made input (WanAnimate2's KV cache) takes the number of layers


def inputs(name: str, seed: int = 0) -> dict:
    """Fresh forward kwargs of class ``name`` (random tensors drawn from ``seed``)."""
    return _make(ZOO[name].inputs, torch.Generator().manual_seed(seed))


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny model of class ``name``, weights from ``seed``, in eval mode."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        from diffusers.models import transformers as _T

        cls = getattr(_T, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**ZOO[name].init)
    return model.eval()


NAMES = tuple(ZOO)
