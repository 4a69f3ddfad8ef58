"""PEFT's names for what lorakit also has: LoraConfig fields and values, and default target modules.

A PEFT user's settings (``peft.LoraConfig(...)``, its ``to_dict()``, or the ``adapter_config.json`` PEFT
writes) translate field by field (``LoraConfig.from_peft``; ``LoraConfig.from_dict`` takes both names):

    PEFT field              lorakit field     value
    r, target_modules, exclude_modules, bias, modules_to_save, layers_to_transform, layers_pattern,
    rank_pattern, alpha_pattern, task_type, lora_bias                same name, same meaning
    lora_alpha              alpha
    lora_dropout            dropout           None -> 0.0
    use_rslora              rslora            s = alpha / sqrt(r)  (rsLoRA, Kalajdzievski 2023)
    use_dora                dora              DoRA (Liu et al. 2024)
    init_lora_weights       init              True -> "kaiming" (PEFT's default), "gaussian" -> "gaussian"
    fan_in_fan_out          -                 read from the layer type (GPT-2 Conv1D stores (in, out));
                                              PEFT corrects a wrong value the same way
    peft_type ("LORA"), base_model_name_or_path, revision, inference_mode, auto_mapping, peft_version,
    runtime_config, megatron_core, qalora_group_size                 metadata or settings of unused
                                                                     features: ignored

``target_modules=None`` means what it means in PEFT: the usual attention projections of the model's
architecture, from ``DEFAULT_TARGETS`` (PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
resolved when the model is known (``plan_lora``), with a warning naming the modules picked.

Options that change only training or initialisation leave a file that is plain LoRA at inference
(``TRAINING_ONLY``, ``INIT_TRAINING_ONLY``): loading such a file is exact; making a new adapter with them
is refused by name (VeLoRA is accepted with a warning: it only saves activation memory). Inits that
change the base weights (``INIT_CHANGES_BASE``) and the options in ``UNSUPPORTED`` are refused by name.
"""

from __future__ import annotations

import warnings

from lorakit.errors import LoraError

RENAMED = {"lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora", "use_dora": "dora",
           "init_lora_weights": "init"}
SAME = ("r", "target_modules", "exclude_modules", "bias", "modules_to_save", "layers_to_transform",
        "layers_pattern", "rank_pattern", "alpha_pattern", "task_type", "lora_bias")
IGNORED = ("peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
           "peft_version", "fan_in_fan_out", "runtime_config", "megatron_core", "qalora_group_size")
TRAINING_ONLY = {"velora_config": "VeLoRA (compressed activations in the backward pass of A)",
                 "eva_config": "EVA (data-driven init of A)"}
UNSUPPORTED = {
    "alora_invocation_tokens": "aLoRA (the adapter acts only after invocation tokens)",
    "layer_replication": "layer replication (stacked copies of base layers)",
    "trainable_token_indices": "trainable tokens (a second adapter on the embedding rows)",
    "target_parameters": "LoRA on nn.Parameter targets (MoE expert weights)",
    "use_qalora": "QALoRA (pooled inputs on GPTQ layers)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "megatron_config": "Megatron parallel layers",
    "kasa_config": "KaSA (a learnt singular-value diagonal between A and B)",
    "monteclora_config": "MonteCLoRA (Monte Carlo sampled factors)",
    "arrow_config": "Arrow routing between adapters",
    "ensure_weight_tying": "adapters tied across tied embedding / output layers",
    "loftq_config": "LoftQ (quantized base plus residual init)",
    "corda_config": "CorDA (base weights replaced by a residual)",
    "lora_ga_config": "LoRA-GA (base weights offset by the init)",
}
INIT_TRAINING_ONLY = {False: "random A and B (PEFT's debugging init)", "eva": "EVA (data-driven A)",
                      "orthogonal": "orthogonal A and B with B A = 0",
                      "mica": "MiCA (B from the base's minor singular vectors, frozen; A trained)"}
INIT_CHANGES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# PEFT's PeftModelFor<Task> trains these heads in full (modules_to_save) when the model has them.
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft/utils/constants.py), by config.model_type;
# the last row is lorakit's additions (names checked against transformers 5.24).
DEFAULT_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"], "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)", "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    # lorakit's additions
    "whisper": ["q_proj", "v_proj"], "distilbert": ["q_lin", "v_lin"], "phi3": ["qkv_proj"],
}


def plain(value):
    """PEFT's enums (PeftType.LORA, TaskType.SEQ_CLS) and sets as plain JSON-like values."""
    value = getattr(value, "value", value)
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def translate(data: dict, new_adapter: bool) -> dict:
    """lorakit's LoraConfig fields from a dict in PEFT's names (lorakit's own names pass through).

    ``new_adapter=True`` (``from_peft`` / ``from_dict``): the adapter will be trained here, so options
    whose training lorakit does not implement are refused. ``False`` (an adapter file): options that
    only shaped training are accepted, because the file is plain LoRA at inference.
    """
    data = {key: plain(value) for key, value in data.items()}
    if data.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"peft_type={data['peft_type']!r}: lorakit's LoraConfig describes LORA adapters")
    for key, what in UNSUPPORTED.items():
        if data.get(key):
            raise LoraError(f"{key}={data[key]!r} asks for {what}, which lorakit does not implement; "
                            "using the adapter without it would silently compute something else")
    for key, what in TRAINING_ONLY.items():
        if data.get(key) and new_adapter:
            if key != "velora_config":
                raise LoraError(f"{key} asks for {what}, which lorakit does not implement for training; "
                                "adapters trained with it in PEFT load as plain LoRA (load_adapter)")
            warnings.warn(f"{key}: {what} is not implemented; lorakit trains the same LoRA with the "
                          "exact gradient (more activation memory)", stacklevel=4)
    out, source = {}, {}
    for key, value in data.items():
        if key in IGNORED or key in UNSUPPORTED or key in TRAINING_ONLY:
            continue
        name = RENAMED.get(key, key)
        if key == "init_lora_weights":
            value = _init_value(value, new_adapter)
        elif key == "lora_dropout" and value is None:
            value = 0.0
        elif key in ("rank_pattern", "alpha_pattern") and value is None:
            value = {}
        elif key == "bias" and value is None:
            value = "none"
        if name in out and out[name] != value:
            raise LoraError(f"{source[name]}={data[source[name]]!r} and {key}={data[key]!r} name the "
                            "same setting with different values; pass one of them")
        out[name], source[name] = value, key
    return out


def _init_value(value, new_adapter: bool) -> str:
    if value is True or value == "gaussian":
        return "kaiming" if value is True else "gaussian"
    if isinstance(value, str) and value.startswith(INIT_CHANGES_BASE):
        raise LoraError(f"init_lora_weights={value!r} changes the base weights as well (PiSSA / OLoRA / "
                        "CorDA / LoftQ / LoRA-GA style); convert the adapter to plain LoRA in PEFT first "
                        "(save_pretrained(path_initial_model_for_weight_conversion=...)), or use "
                        "lorakit's 'pissa' method to train one here")
    if value is False or (isinstance(value, str) and value in INIT_TRAINING_ONLY):
        if not new_adapter:
            return "kaiming"                     # the file's factors replace the init anyway
        raise LoraError(f"init_lora_weights={value!r} ({INIT_TRAINING_ONLY[value]}) is not implemented "
                        "for training here; use True (kaiming) or 'gaussian'. Adapters trained with it in "
                        "PEFT are plain LoRA and load with load_adapter")
    raise LoraError(f"init_lora_weights={value!r} is not a LoRA init lorakit knows; use True (kaiming), "
                    "'gaussian', or see lorakit.peft_names for PEFT's other inits")
