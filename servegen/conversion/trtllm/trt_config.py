"""config.json of a TensorRT-LLM checkpoint, both ways. The keys are those its
PretrainedConfig.to_dict writes for a Llama (LLaMAConfig) or a Qwen2 (QWenConfig) in
TensorRT-LLM 1.x (tensorrt_llm/models/modeling_utils.py, models/llama/config.py,
models/qwen/config.py), with `mapping` as its Mapping.to_dict writes it, less the rank
(tensorrt_llm/mapping.py), and no quantization."""

from pathlib import Path

from servegen.conversion.trtllm.model import ModelShape, check_architecture
from servegen.errors import ConversionError

# QuantConfig's fields and defaults, nothing quantized
QUANTIZATION = {
    "quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128, "smoothquant_val": 0.5, "clamp_val": None,
    "use_meta_recipe": False, "has_zero_point": False, "pre_quant_scale": False, "exclude_modules": None,
}
# LLaMAConfig's own fields, at the values its from_hugging_face gives a plain Llama or Mistral
LLAMA_FIELDS = {
    "residual_mlp": False, "remove_duplicated_kv_heads": False, "fc_after_embed": False,
    "use_input_layernorm_in_first_layer": True, "use_last_layernorm": True, "layer_idx_offset": 0,
    "embedding_multiplier": 1.0, "attention_multiplier": 1.0, "residual_multiplier": 1.0,
    "output_multiplier_scale": 1.0, "has_partial_lora_mask": False,
}
# QWenConfig's, for a Qwen2 (seq_length: the default it takes when the HF config has none)
QWEN2_FIELDS = {
    "qwen_type": "qwen2", "use_logn_attn": False, "mlp_only_layers": [], "decoder_sparse_step": 1, "seq_length": 8192,
    "moe_intermediate_size": 0, "moe_shared_expert_intermediate_size": 0, "num_labels": 1,
}


def trtllm_config(m: ModelShape, tp: int, pp: int, dtype: str, use_parallel_embedding: bool) -> dict:
    qwen = m.architecture == "Qwen2ForCausalLM"
    config = {
        "architecture": m.architecture, "dtype": dtype, "logits_dtype": "float32", "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads, "head_size": m.head_size, "intermediate_size": m.intermediate_size,
        "max_position_embeddings": m.max_position_embeddings, "hidden_act": m.hidden_act, "norm_epsilon": m.norm_epsilon,
        "position_embedding_type": "rope_gpt_neox", "rotary_embedding_dim": m.head_size, "rotary_base": m.rope_theta,
        "rotary_scaling": m.rope_scaling, "runtime_defaults": None, "qk_layernorm": False,
        "mapping": _mapping(tp, pp), "quantization": dict(QUANTIZATION),
        "use_parallel_embedding": use_parallel_embedding, "embedding_sharding_dim": 0,
        "tie_word_embeddings": m.tie_word_embeddings, "mlp_bias": False, "attn_bias": m.qkv_bias,
        "disable_weight_only_quant_plugin": False, "moe": _no_moe(qwen),
    }
    config.update(QWEN2_FIELDS if qwen else LLAMA_FIELDS)
    return config


def _mapping(tp: int, pp: int) -> dict:
    return {
        "world_size": tp * pp, "gpus_per_node": 8, "cp_size": 1, "tp_size": tp, "pp_size": pp, "moe_tp_size": tp,
        "moe_cluster_size": 1, "moe_ep_size": 1, "attn_tp_size": tp, "attn_cp_size": 1, "cp_config": {},
        "enable_attention_dp": False, "enable_lm_head_tp_in_adp": False,
    }


def _no_moe(qwen: bool) -> dict:
    """MoeConfig with no experts; QWenConfig's normalization mode is NONE (0), LLaMAConfig's None."""
    return {
        "num_experts": 0, "shared_expert_intermediate_size": 0, "top_k": 0, "normalization_mode": 0 if qwen else None,
        "sparse_mixer_epsilon": 0.01, "tp_mode": 0, "device_limited_n_group": 0, "device_limited_topk_group": 0,
        "device_limited_routed_scaling_factor": 1.0,
    }


def read_trtllm_config(src: Path, c: dict) -> tuple[ModelShape, int, int]:
    """The model and its (tp, pp) from a checkpoint's config.json; one this converter could not
    have written (quantized, another architecture, split otherwise) is refused."""
    where = src / "config.json"
    try:
        arch, mapping = c["architecture"], c["mapping"]
        check_architecture(where, arch)
        quant = c.get("quantization") or {}
        algo = quant.get("quant_algo") or quant.get("kv_cache_quant_algo")
        if algo:
            raise ConversionError(f"{where}: a quantized checkpoint ({algo}) cannot convert back")
        if c.get("use_parallel_embedding") and c.get("embedding_sharding_dim", 0) != 0:
            raise ConversionError(f"{where}: embedding_sharding_dim {c['embedding_sharding_dim']} is not supported (only 0)")
        if mapping.get("cp_size", 1) != 1:
            raise ConversionError(f"{where}: cp_size {mapping['cp_size']} is not supported (only 1)")
        shape = ModelShape(
            architecture=arch, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"], head_size=c["head_size"],
            intermediate_size=c["intermediate_size"], max_position_embeddings=c["max_position_embeddings"],
            hidden_act=c["hidden_act"], norm_epsilon=c["norm_epsilon"], rope_theta=float(c["rotary_base"]),
            rope_scaling=c.get("rotary_scaling"), tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bool(c.get("attn_bias", False)),
        )
        return shape, mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    except KeyError as e:
        raise ConversionError(f"{where}: no {e.args[0]}; not a TensorRT-LLM checkpoint config this converter reads") from None
