"""LLaMA presets and Hugging Face models built from a local config.json."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM, OPTConfig

from lr_lightning.models.llama import (
    LLAMA_SIZES,
    build_causal_lm,
    context_length,
    decoder_layers,
    hf_config_with,
    llama_config,
    load_hf_config,
)


@pytest.mark.parametrize("size", ["llama-9m", "llama-20m", "llama-35m", "llama-60m", "llama-130m"])
def test_each_preset_has_about_the_parameters_its_name_says_at_the_published_vocabulary(size):
    config = llama_config(size)
    assert (config.vocab_size, config.max_position_embeddings, config.hidden_act) == (32100, 1024, "silu")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    named = float(size.removeprefix("llama-").removesuffix("m"))
    assert abs(millions - named) / named < 0.05, (size, millions)


def test_the_larger_presets_keep_the_published_width_to_depth_shapes():
    assert [LLAMA_SIZES[s]["num_hidden_layers"] for s in ("llama-350m", "llama-1b")] == [24, 24]
    assert [LLAMA_SIZES[s]["hidden_size"] // LLAMA_SIZES[s]["num_attention_heads"]
            for s in ("llama-350m", "llama-1b")] == [64, 64]


def test_vocab_size_and_block_size_replace_the_presets():
    config = llama_config("llama-9m", vocab_size=2048, block_size=256)
    assert (config.vocab_size, config.max_position_embeddings, config.hidden_size) == (2048, 256, 128)


def test_unknown_preset_names_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown LLaMA size 'llama-7m'; allowed: llama-tiny, llama-9m"):
        llama_config("llama-7m")


def _write(path, settings) -> str:
    path.write_text(json.dumps(settings))
    return str(path)


def test_a_local_config_builds_its_causal_lm_with_random_weights(tmp_path):
    settings = OPTConfig(hidden_size=32, ffn_dim=64, num_attention_heads=2, num_hidden_layers=2, vocab_size=50,
                         max_position_embeddings=16, word_embed_proj_dim=32).to_dict()
    (tmp_path / "opt").mkdir()
    folder = tmp_path / "opt"
    _write(folder / "config.json", settings)
    config = hf_config_with(load_hf_config(folder), vocab_size=64, block_size=32)  # the folder or the file
    model = build_causal_lm(config)
    assert type(model).__name__ == "OPTForCausalLM"
    assert model.get_input_embeddings().weight.shape == (64, 32) and context_length(config) == 32
    assert [type(m).__name__ for m in decoder_layers(model)] == ["OPTDecoderLayer"] * 2
    assert load_hf_config(folder / "config.json").model_type == "opt"


@pytest.mark.parametrize(("content", "message"), [
    (None, "is not a config.json file nor a folder holding one"),
    ("{not json", "is not a readable JSON file"),
    ({"hidden_size": 8}, "has no 'model_type'"),
    ({"model_type": "no-such-model"}, "no-such-model"),
])
def test_a_bad_config_path_is_a_value_error_naming_it(content, message, tmp_path):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        load_hf_config(path)
    assert "config_path" in str(error.value)


def test_a_config_of_no_causal_lm_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no causal LM for a ViTConfig"):
        build_causal_lm(load_hf_config(_write(tmp_path / "config.json", {"model_type": "vit"})))
