"""LLaMA presets and Hugging Face causal LMs built from a config, never from downloaded weights.

``transformers`` is imported inside the builders, so importing this module (and ``lr_lightning.models``) stays
cheap; only a task that builds a ``llama`` or ``hf`` model pays for it.

:data:`LLAMA_SIZES` are the LLaMA shapes of the ReLoRA and GaLore experiments, as published in
``configs/llama_<size>.json`` of github.com/Guitaricet/relora (all with ``hidden_act: silu``,
``rms_norm_eps: 1e-6``, ``initializer_range: 0.02``, 1024 positions and a T5 vocabulary of 32100):

=========== ====== ============ ===== ======
preset      hidden intermediate heads layers
=========== ====== ============ ===== ======
llama-9m    128    352          4     4
llama-20m   256    688          4     4
llama-35m   384    1024         8     6
llama-60m   512    1376         8     8
llama-130m  768    2048         12    12
llama-350m  1024   2736         16    24
llama-1b    2048   5461         32    24
=========== ====== ============ ===== ======

``llama-tiny`` (64, 176, 2 heads, 2 layers) is not published: it is the smoke-test size for CPU tests.
The names count parameters at the published vocabulary; a task passes its own ``vocab_size`` (a local BPE's)
and context length instead of 32100 and 1024.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

LLAMA_COMMON: dict[str, Any] = dict(hidden_act="silu", rms_norm_eps=1e-6, initializer_range=0.02,
                                    max_position_embeddings=1024, vocab_size=32100, bos_token_id=0, eos_token_id=1,
                                    tie_word_embeddings=False)
"""Settings every ReLoRA/GaLore LLaMA config shares (``max_sequence_length`` there is ``max_position_embeddings``)."""

LLAMA_SIZES: dict[str, dict[str, int]] = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=176, num_attention_heads=2, num_hidden_layers=2),
    "llama-9m": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_hidden_layers=4),
    "llama-20m": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_hidden_layers=4),
    "llama-35m": dict(hidden_size=384, intermediate_size=1024, num_attention_heads=8, num_hidden_layers=6),
    "llama-60m": dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "llama-130m": dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12),
    "llama-350m": dict(hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
}
"""Shapes of the LLaMA presets (see the module docstring for their source)."""

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
"""Config attributes that give a Hugging Face model's longest context, first found wins."""


def check_llama_size(size: str) -> None:
    """Raise a ``ValueError`` naming the allowed presets unless ``size`` is one of :data:`LLAMA_SIZES`."""
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown LLaMA size {size!r}; allowed: {', '.join(LLAMA_SIZES)}")


def llama_config(size: str, vocab_size: int | None = None, block_size: int | None = None) -> PretrainedConfig:
    """The ``LlamaConfig`` of preset ``size``; ``vocab_size`` and ``block_size`` (positions) replace 32100 and 1024."""
    from transformers import LlamaConfig

    check_llama_size(size)
    settings = {**LLAMA_COMMON, **LLAMA_SIZES[size]}
    if vocab_size is not None:
        settings["vocab_size"] = vocab_size
    if block_size is not None:
        settings["max_position_embeddings"] = block_size
    return LlamaConfig(**settings)


def config_file(config_path: str | Path) -> Path:
    """The ``config.json`` that ``config_path`` names (the file, or a folder holding one); ``ValueError`` if none."""
    path = Path(config_path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"config_path {str(config_path)!r} is not a config.json file nor a folder holding one")
    return file


def load_hf_config(config_path: str | Path) -> PretrainedConfig:
    """The Hugging Face config saved at ``config_path`` (read locally, nothing downloaded)."""
    from transformers import AutoConfig

    file = config_file(config_path)
    try:
        settings = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"config_path {str(file)!r} is not a readable JSON file: {error}") from None
    model_type = settings.pop("model_type", None) if isinstance(settings, dict) else None
    if model_type is None:
        raise ValueError(f"config_path {str(file)!r} has no 'model_type': it is not a Hugging Face model config")
    try:
        return AutoConfig.for_model(model_type, **settings)
    except ValueError as error:
        raise ValueError(f"config_path {str(file)!r}: {' '.join(str(error).splitlines())}") from None


def context_length(config: PretrainedConfig) -> int | None:
    """The longest context ``config`` declares (:data:`CONTEXT_KEYS`), or ``None``."""
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_causal_lm(config: PretrainedConfig) -> PreTrainedModel:
    """A freshly initialised ``AutoModelForCausalLM`` of ``config`` (float32, random weights), its ``Conv1D``
    projections (GPT-2's) as ``nn.Linear`` (:func:`conv1d_as_linear`) so that strategies can convert them."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_config(config)
    except ValueError as error:
        raise ValueError(f"no causal LM for a {type(config).__name__} (model_type {config.model_type!r}): "
                         f"{' '.join(str(error).splitlines())[:300]}") from None
    conv1d_as_linear(model)
    return model


def conv1d_as_linear(model: nn.Module) -> list[str]:
    """Replace each ``transformers`` ``Conv1D`` (``y = x W + b``, ``W`` of shape ``(in, out)``) by the ``nn.Linear``
    holding ``W^T`` and ``b``: the same function. Returns the replaced modules' names."""
    from transformers.pytorch_utils import Conv1D

    names = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        linear = nn.Linear(conv.nx, conv.nf, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.T)
            linear.bias.copy_(conv.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, linear)
    return names


def linear_as_conv1d(model: nn.Module, names: list[str]) -> None:
    """Undo :func:`conv1d_as_linear` for the ``nn.Linear`` modules ``names`` (so ``save_pretrained`` writes the
    layout the architecture's own class loads)."""
    from transformers.pytorch_utils import Conv1D

    for name in names:
        linear = model.get_submodule(name)
        conv = Conv1D(linear.out_features, linear.in_features).to(device=linear.weight.device,
                                                                   dtype=linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.T)
            conv.bias.copy_(linear.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, conv)


def conv1d_names(config: PretrainedConfig) -> list[str]:
    """The names of the ``Conv1D`` modules of ``config``'s causal LM (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [name for name, module in model.named_modules() if isinstance(module, Conv1D)]


def hf_config_with(config: PretrainedConfig, vocab_size: int | None, block_size: int | None) -> PretrainedConfig:
    """``config`` with ``vocab_size`` and its context length (the first of :data:`CONTEXT_KEYS` it has) replaced
    where given."""
    if vocab_size is not None:
        config.vocab_size = vocab_size
    if block_size is not None:
        key = next((k for k in CONTEXT_KEYS if isinstance(getattr(config, k, None), int)), None)
        if key is not None:
            setattr(config, key, block_size)
    return config


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model: modules whose class is one of its ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]
