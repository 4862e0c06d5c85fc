import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lr_lightning.models import GPT, GPT_SIZES, GPTConfig


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(**{"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides})


def test_logits_shape():
    model = GPT(tiny_config())
    idx = torch.randint(0, 32, (3, 10))
    assert model(idx).shape == (3, 10, 32)


def test_sequence_longer_than_block_size_raises():
    model = GPT(tiny_config(block_size=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_causality():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 32, (2, 12))
    changed = idx.clone()
    t = 7
    changed[:, t] = (idx[:, t] + 1) % 32
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t:], after[:, t:])


def test_tied_weights_are_one_parameter():
    tied = GPT(tiny_config())
    assert tied.lm_head.weight is tied.wte.weight
    untied = GPT(tiny_config(tie_weights=False))
    assert untied.lm_head.weight is not untied.wte.weight
    extra = untied.lm_head.weight.numel()
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + extra


def test_num_parameters_excludes_embedding_tables():
    config = tiny_config(tie_weights=False)
    model = GPT(config)
    total = model.num_parameters(exclude_embeddings=False)
    embeddings = (config.vocab_size + config.block_size) * config.n_embd
    assert model.num_parameters() == total - embeddings
    tied = GPT(tiny_config())
    assert tied.num_parameters() == tied.num_parameters(exclude_embeddings=False) - config.block_size * config.n_embd


def test_linear_module_names():
    model = GPT(tiny_config())
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    per_block = {f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert linears == per_block | {"lm_head"}


def test_linears_are_called_as_submodules():
    class Doubled(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self.linear(x)

    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 32, (1, 8))
    for block in model.blocks:
        for parent, name in ((block.attn, "qkv"), (block.attn, "proj"), (block.mlp, "fc"), (block.mlp, "proj")):
            with torch.no_grad():
                before = model(idx)
                setattr(parent, name, Doubled(getattr(parent, name)))
                assert not torch.allclose(model(idx), before), f"{name} not called through the submodule"


def test_init_is_deterministic_and_scaled():
    torch.manual_seed(123)
    a = GPT(tiny_config(n_layer=4, n_embd=64))
    torch.manual_seed(123)
    b = GPT(tiny_config(n_layer=4, n_embd=64))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert torch.count_nonzero(a.blocks[0].attn.qkv.bias) == 0
    proj_std = torch.cat([b.mlp.proj.weight.flatten() for b in a.blocks]).std().item()
    assert proj_std == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)
    assert a.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n_embd": 30, "n_head": 4}, "n_embd"),
        ({"n_layer": 0}, "n_layer"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"activation": "swish"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**overrides)


def test_from_size():
    config = GPTConfig.from_size("opt-125m", vocab_size=1000)
    assert (config.n_layer, config.n_embd, config.block_size, config.activation) == (12, 768, 2048, "relu")
    assert config.vocab_size == 1000
    assert GPTConfig.from_size("tiny").n_embd == 64
    assert set(GPT_SIZES) == {"tiny", "mini", "small", "gpt2-small", "opt-125m"}
    with pytest.raises(ValueError, match="tiny, mini"):
        GPTConfig.from_size("huge")


def test_loss_decreases_on_repeated_sequence():
    torch.manual_seed(0)
    model = GPT(tiny_config(activation="relu"))
    seq = torch.randint(0, 32, (1, 17)).repeat(4, 1)
    x, y = seq[:, :-1], seq[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gpt2_small_preset_has_gpt2_parameter_count():
    model = GPT(GPTConfig.from_size("gpt2-small", vocab_size=50257))
    assert model.num_parameters(exclude_embeddings=False) == 124_439_808  # GPT-2 small, as nanoGPT counts it
