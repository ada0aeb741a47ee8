"""Tiny models built from configs shaped like the ones real families ship: the real config.json's field set and
quirks (pad tokens, tied heads, rope scaling, sliding windows, biases, soft-capping, logit scales, auto_map,
`torch_dtype`, an `attn_implementation` the CPU cannot run), only the sizes shrunk.

Each entry is the real config.json of a published checkpoint (named in its comment) with sizes replaced: hidden
width 32, 2-3 layers, 4 heads, evalkit's byte-level BPE tokenizer (<pad>=0, <s>=1, </s>=2; 259 tokens) and 8
rows of padding in the embedding, 128 positions, and sliding windows shorter than the test windows so they matter.
Special-token ids are mapped onto the tiny tokenizer, keeping each family's pattern (a pad token equal to EOS for
SmolLM2, a pad row past the tokenizer for Phi-3, ...). Weights are random (std 0.2, so layers matter) and saved
with `save_pretrained` (in the dtype the real checkpoint ships, where that is not float32), plus how the real
checkpoint names its tensors where transformers' own saving would differ (GPT-2 and OPT without the base-model
prefix, Mixtral's per-expert tensors).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from evalkit import make_tokenizer

VOCAB = "<vocab>"     # the tokenizer's size plus 8 rows, as real models pad their vocabulary (set in make_family)
TOK = "<tokens>"      # the first row past the tokenizer (Phi-3's pad token)

# config.json of each family, sizes shrunk; "_save" says how the real checkpoint stores it (dtype, name prefix)
CONFIGS: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct: pad = EOS = 2, tied embeddings
    "smollm2": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
                "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32,
                "initializer_range": 0.041666666666666664, "intermediate_size": 64, "is_llama_config": True,
                "max_position_embeddings": 128, "model_type": "llama", "num_attention_heads": 4,
                "num_hidden_layers": 3, "num_key_value_heads": 2, "pad_token_id": 2, "pretraining_tp": 1,
                "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
                "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
                "use_cache": True, "vocab_size": VOCAB},
    # meta-llama/Llama-3.2-1B: llama3 rope scaling, tied, head_dim, mlp_bias, a list of EOS ids
    "llama": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 1, "eos_token_id": [2, 0], "head_dim": 8, "hidden_act": "silu", "hidden_size": 32,
              "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 128,
              "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
              "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
              "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                               "original_max_position_embeddings": 16, "rope_type": "llama3"},
              "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
              "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": VOCAB},
    # mistralai/Mistral-7B-v0.1: sliding window (8 here, shorter than the windows), untied
    "mistral": {"architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
                "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
                "intermediate_size": 64, "max_position_embeddings": 128, "model_type": "mistral",
                "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
                "rope_theta": 10000.0, "sliding_window": 8, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True,
                "vocab_size": VOCAB},
    # Qwen/Qwen2.5-0.5B with its yarn rope scaling and a sliding window on the upper layers (max_window_layers);
    # q/k/v biases, tied
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2,
              "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
              "intermediate_size": 64, "max_position_embeddings": 128, "max_window_layers": 1,
              "model_type": "qwen2", "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-06,
              "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32, "type": "yarn"},
              "rope_theta": 1000000.0, "sliding_window": 8, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
              "use_sliding_window": True, "vocab_size": VOCAB},
    # Qwen/Qwen3-0.6B: q/k norms, head_dim, tied
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 1, "eos_token_id": 2, "head_dim": 16, "hidden_act": "silu", "hidden_size": 32,
              "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 128,
              "max_window_layers": 2, "model_type": "qwen3", "num_attention_heads": 4, "num_hidden_layers": 2,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
              "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
              "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
              "vocab_size": VOCAB},
    # google/gemma-2b: the embedding normaliser (sqrt(hidden)), gelu, one kv head, pad 0
    "gemma": {"architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 1, "eos_token_id": 2, "head_dim": 16, "hidden_act": "gelu", "hidden_size": 32,
              "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 128,
              "model_type": "gemma", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 1,
              "pad_token_id": 0, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
              "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0", "use_cache": True,
              "vocab_size": VOCAB},
    # google/gemma-2-2b: attention and final-logit soft-capping, sliding window, query_pre_attn_scalar
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
               "attn_logit_softcapping": 50.0, "bos_token_id": 1, "cache_implementation": "hybrid",
               "eos_token_id": [2, 0], "final_logit_softcapping": 3.0, "head_dim": 16,
               "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 32,
               "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 128,
               "model_type": "gemma2", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
               "pad_token_id": 0, "query_pre_attn_scalar": 16, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
               "sliding_window": 8, "torch_dtype": "float32", "transformers_version": "4.42.4",
               "use_cache": True, "vocab_size": VOCAB},
    # google/gemma-3-1b-pt: local/global layers (sliding_window_pattern), two rope bases, q/k norms
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
               "attn_logit_softcapping": None, "bos_token_id": 1, "cache_implementation": "hybrid",
               "eos_token_id": [2, 0], "final_logit_softcapping": None, "head_dim": 16,
               "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 32, "initializer_range": 0.02,
               "intermediate_size": 64, "max_position_embeddings": 128, "model_type": "gemma3_text",
               "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 1, "pad_token_id": 0,
               "query_pre_attn_scalar": 16, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
               "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 8, "sliding_window_pattern": 2,
               "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True,
               "vocab_size": VOCAB},
    # microsoft/Phi-3-mini-4k-instruct: pad 32000 (a row past the tokenizer), auto_map to remote code that is
    # never run, a sliding window, untied; an attn_implementation this machine cannot run (as some fine-tunes ship)
    "phi3": {"_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"],
             "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flash_attention_2",
             "auto_map": {"AutoConfig": "configuration_phi3.Phi3Config",
                          "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"},
             "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32,
             "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 128,
             "model_type": "phi3", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
             "original_max_position_embeddings": 128, "pad_token_id": TOK, "resid_pdrop": 0.0,
             "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 15,
             "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.2",
             "use_cache": True, "vocab_size": VOCAB},
    # microsoft/phi-2: lm_head with a bias, partial rotary, dense+fc biases, layer norms
    "phi": {"_name_or_path": "microsoft/phi-2", "activation_function": "gelu_new", "architectures": ["PhiForCausalLM"],
            "attention_dropout": 0.0, "bos_token_id": 2, "embd_pdrop": 0.0, "eos_token_id": 2,
            "hidden_act": "gelu_new", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 128, "model_type": "phi",
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4, "partial_rotary_factor": 0.5,
            "qk_layernorm": False, "resid_pdrop": 0.1, "rope_scaling": None, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.37.0",
            "use_cache": True, "vocab_size": VOCAB},
    # openai-community/gpt2: Conv1D, learned positions, tied, tensors stored without the "transformer." prefix
    "gpt2": {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
             "bos_token_id": 2, "embd_pdrop": 0.1, "eos_token_id": 2, "initializer_range": 0.02,
             "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 128, "n_embd": 32, "n_head": 4,
             "n_layer": 2, "n_positions": 128, "resid_pdrop": 0.1, "summary_activation": None,
             "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
             "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True,
                                                                                     "max_length": 50}},
             "vocab_size": VOCAB, "_save": {"strip_prefix": "transformer."}},
    # CohereForAI/c4ai-command-r-v01: logit_scale, parallel block, layer norm without bias, tied
    "cohere": {"architectures": ["CohereForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
               "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32,
               "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05, "logit_scale": 0.0625,
               "max_position_embeddings": 128, "model_type": "cohere", "num_attention_heads": 4,
               "num_hidden_layers": 2, "num_key_value_heads": 4, "pad_token_id": 0, "rope_theta": 8000000.0,
               "torch_dtype": "float16", "transformers_version": "4.38.2", "use_cache": True,
               "use_qk_norm": False, "vocab_size": VOCAB},
    # ibm-granite/granite-3.0-2b-base: logits_scaling, embedding/attention/residual multipliers, tied
    "granite": {"architectures": ["GraniteForCausalLM"], "attention_bias": False, "attention_dropout": 0.1,
                "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0,
                "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
                "intermediate_size": 64, "logits_scaling": 8.0, "max_position_embeddings": 128, "mlp_bias": False,
                "model_type": "granite", "num_attention_heads": 4, "num_hidden_layers": 2,
                "num_key_value_heads": 2, "pad_token_id": 0, "residual_multiplier": 0.22, "rms_norm_eps": 1e-05,
                "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": True,
                "torch_dtype": "bfloat16", "transformers_version": "4.46.0.dev0", "use_cache": True,
                "vocab_size": VOCAB},
    # facebook/opt-350m: embeddings narrower than the hidden size (project_in/out), post-norm layers, learned
    # positions with an offset, pad 1, tensors stored without the "model." prefix
    "opt": {"_name_or_path": "facebook/opt-350m", "activation_dropout": 0.0, "activation_function": "relu",
            "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2,
            "do_layer_norm_before": False, "dropout": 0.1, "eos_token_id": 2, "ffn_dim": 64, "hidden_size": 32,
            "init_std": 0.02, "layerdrop": 0.0, "max_position_embeddings": 128, "model_type": "opt",
            "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 1, "prefix": "</s>",
            "torch_dtype": "float16", "transformers_version": "4.20.0.dev0", "use_cache": True,
            "vocab_size": VOCAB, "word_embed_proj_dim": 16, "_save": {"strip_prefix": "model."}},
    # EleutherAI/gpt-j-6b: lm_head with a bias, rotary_dim, parallel block
    "gptj": {"activation_function": "gelu_new", "architectures": ["GPTJForCausalLM"], "attn_pdrop": 0.0,
             "bos_token_id": 2, "embd_pdrop": 0.0, "eos_token_id": 2, "gradient_checkpointing": False,
             "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gptj", "n_embd": 32,
             "n_head": 4, "n_inner": None, "n_layer": 2, "n_positions": 128, "resid_pdrop": 0.0, "rotary": True,
             "rotary_dim": 4, "scale_attn_weights": True, "tie_word_embeddings": False,
             "tokenizer_class": "GPT2Tokenizer", "transformers_version": "4.18.0.dev0", "use_cache": True,
             "vocab_size": VOCAB},
    # EleutherAI/pythia-160m: the head is `embed_out`, partial rotary, parallel residual
    "gpt_neox": {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
                 "hidden_act": "gelu", "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
                 "layer_norm_eps": 1e-05, "max_position_embeddings": 128, "model_type": "gpt_neox",
                 "num_attention_heads": 4, "num_hidden_layers": 2, "rotary_emb_base": 10000, "rotary_pct": 0.25,
                 "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.24.0",
                 "use_cache": True, "use_parallel_residual": True, "vocab_size": VOCAB},
    # bigcode/starcoder2-3b: biases everywhere, layer norm, sliding window, tied
    "starcoder2": {"architectures": ["Starcoder2ForCausalLM"], "attention_dropout": 0.1, "residual_dropout": 0.1,
                   "embedding_dropout": 0.1, "bos_token_id": 1, "eos_token_id": 2,
                   "hidden_act": "gelu_pytorch_tanh", "hidden_size": 32, "initializer_range": 0.018042,
                   "intermediate_size": 64, "layer_norm_epsilon": 1e-05, "max_position_embeddings": 128,
                   "mlp_type": "default", "model_type": "starcoder2", "norm_epsilon": 1e-05,
                   "norm_type": "layer_norm", "num_attention_heads": 4, "num_hidden_layers": 2,
                   "num_key_value_heads": 2, "rope_theta": 999999.4420358813, "sliding_window": 8,
                   "torch_dtype": "bfloat16", "transformers_version": "4.37.0.dev0", "use_bias": True,
                   "use_cache": True, "vocab_size": VOCAB},
    # tiiuae/falcon-7b: multi-query attention, parallel attention and MLP, no biases, tied
    "falcon": {"alibi": False, "apply_residual_connection_post_layernorm": False,
               "architectures": ["FalconForCausalLM"], "attention_dropout": 0.0, "bias": False, "bos_token_id": 2,
               "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 32, "initializer_range": 0.02,
               "layer_norm_epsilon": 1e-05, "model_type": "falcon", "multi_query": True,
               "new_decoder_architecture": False, "num_attention_heads": 4, "num_hidden_layers": 2,
               "parallel_attn": True, "torch_dtype": "bfloat16", "transformers_version": "4.27.4",
               "use_cache": True, "vocab_size": VOCAB},
    # bigscience/bloom-560m: ALiBi, a layer norm on the embeddings, pad 3, tied, stored without "transformer."
    "bloom": {"apply_residual_connection_post_layernorm": False, "architectures": ["BloomForCausalLM"],
              "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
              "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 32,
              "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True,
              "model_type": "bloom", "n_head": 4, "n_inner": None, "n_layer": 2, "offset_alibi": 100,
              "pad_token_id": 3, "pretraining_tp": 1, "skip_bias_add": True, "skip_bias_add_qkv": False,
              "slow_but_exact": False, "unk_token_id": 0, "use_cache": True, "vocab_size": VOCAB,
              "_save": {"strip_prefix": "transformer."}},
    # allenai/OLMo-2-1124-7B: q/k norms, norms after attention and MLP, pad past the tokenizer, float32
    "olmo2": {"architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
              "intermediate_size": 64, "max_position_embeddings": 128, "model_type": "olmo2",
              "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4, "pad_token_id": TOK,
              "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False,
              "torch_dtype": "float32", "transformers_version": "4.47.0.dev0", "use_cache": True,
              "vocab_size": VOCAB},
    # stabilityai/stablelm-2-1_6b: partial rotary, q/k/v biases, layer norms
    "stablelm": {"architectures": ["StableLmForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
                 "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 32, "initializer_range": 0.02,
                 "intermediate_size": 64, "layer_norm_eps": 1e-05, "max_position_embeddings": 128,
                 "model_type": "stablelm", "num_attention_heads": 4, "num_hidden_layers": 2,
                 "num_key_value_heads": 4, "partial_rotary_factor": 0.25, "qk_layernorm": False,
                 "rope_scaling": None, "rope_theta": 10000, "tie_word_embeddings": False,
                 "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": True,
                 "use_parallel_residual": False, "use_qkv_bias": True, "vocab_size": VOCAB},
    # Salesforce/codegen-350M-mono: lm_head with a bias, rotary_dim, fused qkv
    "codegen": {"activation_function": "gelu_new", "architectures": ["CodeGenForCausalLM"], "attn_pdrop": 0.0,
                "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 2, "gradient_checkpointing": False,
                "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "codegen", "n_ctx": 128,
                "n_embd": 32, "n_head": 4, "n_inner": None, "n_layer": 2, "n_positions": 128, "resid_pdrop": 0.0,
                "rotary_dim": 4, "scale_attn_weights": True, "summary_activation": None,
                "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
                "summary_use_proj": True, "tie_word_embeddings": False, "tokenizer_class": "GPT2Tokenizer",
                "torch_dtype": "float16", "transformers_version": "4.21.0.dev0", "use_cache": True,
                "vocab_size": VOCAB},
    # Qwen/Qwen1.5-MoE-A2.7B: routed experts stored one tensor each (transformers 5 fuses them), a shared
    # expert with its gate
    "qwen2_moe": {"architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 2,
                  "decoder_sparse_step": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32,
                  "initializer_range": 0.02, "intermediate_size": 64, "max_position_embeddings": 128,
                  "max_window_layers": 2, "model_type": "qwen2_moe", "moe_intermediate_size": 16,
                  "norm_topk_prob": False, "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
                  "num_hidden_layers": 2, "num_key_value_heads": 4, "output_router_logits": False,
                  "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
                  "shared_expert_intermediate_size": 32, "sliding_window": 128, "tie_word_embeddings": False,
                  "torch_dtype": "bfloat16", "transformers_version": "4.39.0.dev0", "use_cache": True,
                  "use_sliding_window": False, "vocab_size": VOCAB, "_save": {"unfuse_experts": "qwen2_moe"}},
    # mistralai/Mixtral-8x7B-v0.1: what a MoE merge writes (per-expert w1/w2/w3 under block_sparse_moe)
    "mixtral": {"architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
                "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
                "intermediate_size": 64, "max_position_embeddings": 128, "model_type": "mixtral",
                "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2,
                "num_key_value_heads": 2, "num_local_experts": 4, "output_router_logits": False,
                "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
                "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": VOCAB,
                "_save": {"unfuse_experts": "mixtral"}},
}


def _unfuse_experts(state: dict[str, torch.Tensor], style: str) -> dict[str, torch.Tensor]:
    """MoE experts as published (and as mergekit-moe and lazymerge write them): one tensor per expert, where
    transformers 5 holds them fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]). Mixtral: w1/w3/w2 under
    block_sparse_moe (its router too); Qwen2-MoE: gate_proj/up_proj/down_proj under mlp.experts."""
    names = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen2_moe": ("mlp", "gate_proj", "up_proj",
                                                                           "down_proj")}[style]
    out = {}
    for name, t in state.items():
        layer = name.split(".mlp.")[0]
        p = f"{layer}.{names[0]}.experts."
        if name.endswith(".mlp.experts.gate_up_proj"):
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{p}{e}.{names[1]}.weight"] = t[e, :inter].clone()
                out[f"{p}{e}.{names[2]}.weight"] = t[e, inter:].clone()
        elif name.endswith(".mlp.experts.down_proj"):
            for e in range(t.shape[0]):
                out[f"{p}{e}.{names[3]}.weight"] = t[e].clone()
        elif name.endswith(".mlp.gate.weight"):
            out[f"{layer}.{names[0]}.gate.weight"] = t
        else:
            out[name] = t
    return out


def _tokenizer(directory: Path, bos: bool) -> int:
    """evalkit's tokenizer in `directory`, trained once per (parent directory, bos) and copied after that;
    returns its size."""
    import shutil

    cache = directory.parent / f".tokenizer-{'bos' if bos else 'nobos'}"
    if not cache.is_dir():
        files = cache.with_suffix(".tmp")
        files.mkdir(parents=True, exist_ok=True)
        (files / "size").write_text(str(len(make_tokenizer(files, bos=bos))))
        files.rename(cache)
    for f in cache.iterdir():
        if f.name != "size":
            shutil.copyfile(f, directory / f.name)
    return int((cache / "size").read_text())


def make_family(directory: Path, family: str, *, seed: int = 0, std: float = 0.2) -> Path:
    """The tiny `family` model in `directory` (config.json as the real one, weights, tokenizer)."""
    import transformers as T
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    n = _tokenizer(directory, bos=family not in ("gpt2", "opt", "gptj"))
    raw = json.loads(json.dumps(CONFIGS[family]).replace('"<vocab>"', str(n + 8)).replace('"<tokens>"', str(n)))
    save = raw.pop("_save", {})
    attn = raw.pop("attn_implementation", None)
    config = T.AutoConfig.for_model(**raw)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif n.endswith("bias") or family.startswith("gemma"):    # Gemma's norms are (1 + w)
                p.normal_(0.0, 0.1)
            else:
                p.normal_(1.0, 0.1)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(raw.get("torch_dtype"), torch.float32)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if save.get("unfuse_experts"):
        state = _unfuse_experts(state, save["unfuse_experts"])
    if config.tie_word_embeddings:
        head = next((k for k in state if k.endswith("lm_head.weight")), None)
        if head is not None:
            del state[head]
    prefix = save.get("strip_prefix")
    if prefix:
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    # config.json exactly as the real one ships it (shrunk), not as this transformers would rewrite it
    if attn is not None:
        raw["attn_implementation"] = attn
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    return directory
