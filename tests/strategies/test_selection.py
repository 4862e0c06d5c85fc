"""What ``select`` may and may not hand to ``convert``: layers whose parent reads ``.weight`` directly
(``nn.MultiheadAttention.out_proj``, ``nn.TransformerEncoderLayer.linear1/linear2``), layers another strategy already
converted, and an output head tied to an embedding."""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TinyMLP
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lr_lightning.callbacks import LowRankCallback
from lr_lightning.layers import LowRankLayer
from lr_lightning.strategies import SST, TDLRT, FullRank, InRank, LoRA, LowRankStrategy, ReLoRA, SVDTraining

STRATEGIES: dict[str, tuple[type[LowRankStrategy], dict[str, Any]]] = {
    "full": (FullRank, {}),
    "lora": (LoRA, {"rank": 4}),
    "relora": (ReLoRA, {"rank": 4, "merge_every": 3, "restart_warmup_steps": 1}),
    "sst": (SST, {"rank": 4, "iteration_interval": 3, "round_length": 2, "restart_warmup_steps": 1}),
    "inrank": (InRank, {"init_rank": 2, "buffer": 2, "max_rank": 0.5, "warmup_steps": 0, "check_every": 2}),
    "tdlrt": (TDLRT, {"init_rank": 4, "max_rank": 8, "tau": 0.1, "augment_every": 2}),
    "svd": (SVDTraining, {"init": "dense", "sparsify_at": 2}),
}
"""Every strategy with arguments that fit the layers below (the smallest has ``min(m, n) = 8``)."""

D_MODEL, NHEAD, FEEDFORWARD, LAYERS = 16, 2, 32, 2
MHA_REASON = "nn.MultiheadAttention passes out_proj.weight to its functional attention"
ENCODER_REASON = "nn.TransformerEncoderLayer's eval fast path"


def make(key: str, **overrides: Any) -> LowRankStrategy:
    cls, kwargs = STRATEGIES[key]
    return cls(**{**kwargs, **overrides})


class Encoder(nn.Module):
    """Linear -> ``nn.TransformerEncoder`` -> Linear, dropout 0 (its eval forward takes the fast path)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FEEDFORWARD, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.out = nn.Linear(D_MODEL, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.inp(x)))


class Decoder(nn.Module):
    """Linear -> ``nn.TransformerDecoder`` (attending to its own input as memory) -> Linear, dropout 0."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, D_MODEL)
        layer = nn.TransformerDecoderLayer(D_MODEL, NHEAD, FEEDFORWARD, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, LAYERS)
        self.out = nn.Linear(D_MODEL, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.decoder(h, h))


def bypassed(model: nn.Module) -> list[str]:
    """The linears whose parent reads ``.weight`` directly."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            names += [f"{prefix}.self_attn.out_proj", f"{prefix}.linear1", f"{prefix}.linear2"]
        elif isinstance(module, nn.TransformerDecoderLayer):
            names += [f"{prefix}.self_attn.out_proj", f"{prefix}.multihead_attn.out_proj"]
    return names


EXPECTED = {
    Encoder: ["inp", "out"],
    Decoder: ["inp", *[f"decoder.layers.{i}.{leaf}" for i in range(LAYERS) for leaf in ("linear1", "linear2")], "out"],
}
"""What the default selection converts: the decoder layers call ``linear1``/``linear2`` through forward."""


def selected_with_one_warning(strategy: LowRankStrategy, model: nn.Module) -> tuple[list[str], str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = [n for n, _ in strategy.select(model)]
    messages = [str(w.message) for w in caught if "dense" in str(w.message)]
    assert len(messages) == 1, messages
    return names, messages[0]


@pytest.mark.parametrize("architecture", [Encoder, Decoder])
@pytest.mark.parametrize("key", list(STRATEGIES))
def test_default_selection_leaves_weight_read_layers_dense_and_the_rest_trains_alike_in_train_and_eval(
        key, architecture):
    torch.manual_seed(0)
    model = architecture()
    strategy = make(key)
    names, message = selected_with_one_warning(strategy, model)
    assert names == EXPECTED[architecture]
    for name in bypassed(model):
        assert f"'{name}'" in message
    assert MHA_REASON in message and (ENCODER_REASON in message) == (architecture is Encoder)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy.apply(model)
    for name in bypassed(model):
        assert type(model.get_submodule(name)) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)
    converted = [model.get_submodule(n) for n in names]
    if key != "full":
        assert all(isinstance(layer, LowRankLayer) for layer in converted)
    groups = strategy.param_groups(model)
    stepped = {id(p) for g in groups for p in g["params"]}
    factors = {f"{n}.{p}": t for n, layer in zip(names, converted)
               for p, t in layer.named_parameters() if id(t) in stepped and p != "bias"}
    before = {k: t.detach().clone() for k, t in factors.items()}

    optimizer = strategy.wrap_optimizer(torch.optim.Adam(groups, lr=1e-2), model)
    x, target = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        strategy.before_optimizer_step(model, step)
        optimizer.step()
        strategy.after_optimizer_step(model, step + 1)
    unchanged = [k for k, t in factors.items() if torch.equal(t.detach(), before[k])]
    assert not unchanged, f"{key}: these factors did not train: {unchanged}"

    with torch.no_grad():
        trained = model(x)
        model.eval()
        evaluated = model(x)  # the encoder layers take their fast path here
    torch.testing.assert_close(evaluated, trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", list(STRATEGIES))
@pytest.mark.parametrize(("architecture", "pattern", "reason"), [
    (Encoder, "encoder.layers.0.self_attn.out_proj", MHA_REASON),
    (Encoder, "encoder.layers.0.linear1", ENCODER_REASON),
    (Encoder, "*", MHA_REASON),
    (Decoder, "decoder.layers.1.multihead_attn.out_proj", MHA_REASON),
    (Decoder, "*.out_proj", MHA_REASON),
])
def test_targeting_a_weight_read_layer_is_refused_before_anything_changes(key, architecture, pattern, reason):
    model = architecture()
    modules = dict(model.named_modules())
    strategy = make(key, target_modules=["inp", pattern])
    with pytest.raises(ValueError, match=r"'[\w.]+(out_proj|linear1)'.*" + reason) as error:
        strategy.apply(model)
    assert "\n" not in str(error.value)
    assert dict(model.named_modules()) == modules


@pytest.mark.parametrize("key", ["lora", "sst"])
def test_excluding_the_weight_read_layers_from_a_broad_pattern_is_allowed(key):
    model = Decoder()
    strategy = make(key, target_modules=["*"], exclude_modules=["*.out_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [n for n, _ in strategy.select(model)] == EXPECTED[Decoder]


# ----------------------------------------------------------------------------- two strategies on one model
PRODUCERS = [k for k in STRATEGIES if k != "full"]
SAME_LAYERS = {frozenset({"lora", "relora"})}
"""Strategies that produce the same layer class (LoRA and ReLoRA: ``LoRALinear``) may re-apply over each other."""


@pytest.mark.parametrize(("first", "second"), list(itertools.product(PRODUCERS, STRATEGIES)))
def test_a_layer_converted_by_another_strategy_is_an_error_naming_both(first, second):
    model = TinyMLP()
    make(first, target_modules=["body.0"]).apply(model)
    modules = dict(model.named_modules())
    strategy = make(second)
    if first == second or frozenset({first, second}) in SAME_LAYERS:
        strategy.apply(model)
        assert model.body[0] is modules["body.0"]
        return
    layer, owner = type(model.body[0]).__name__, type(strategy).__name__
    for call in (strategy.select, strategy.apply, strategy.report):
        with pytest.raises(ValueError, match=rf"'body\.0' is a {layer}.*{owner}") as error:
            call(model)
        assert "\n" not in str(error.value)
    assert dict(model.named_modules()) == modules  # body.2 was not converted either


def test_every_strategy_declares_the_layers_it_produces():
    for key, (cls, _) in STRATEGIES.items():
        assert isinstance(cls.layer_types, tuple)
        assert all(issubclass(t, LowRankLayer) for t in cls.layer_types)
        assert bool(cls.layer_types) == (key != "full")
    assert LoRA.layer_types == ReLoRA.layer_types


# ----------------------------------------------------------------------------- tied head
class Tied(nn.Module):
    def __init__(self, head_name: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        setattr(self, head_name, nn.Linear(8, 10, bias=False))
        getattr(self, head_name).weight = self.emb.weight


@pytest.mark.parametrize("key", list(STRATEGIES))
@pytest.mark.parametrize(("head_name", "patterns"), [("head", ["head", "body"]), ("proj", ["*"])])
def test_targeting_a_head_tied_to_an_embedding_is_refused_before_anything_changes(key, head_name, patterns):
    model = Tied(head_name)
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=rf"'{head_name}'.*tied to the nn.Embedding 'emb'") as error:
        make(key, target_modules=patterns).apply(model)
    assert "\n" not in str(error.value)
    assert dict(model.named_modules()) == modules
    assert getattr(model, head_name).weight is model.emb.weight
    assert [n for n, _ in make(key).select(model)] == ["body"]  # the default leaves it dense, as before


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyMLP()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, target = batch
        return nn.functional.cross_entropy(self.net(tokens), target)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_callback_refuses_a_model_another_strategy_converted_before_any_step():
    module = Regression()
    LoRA(rank=4).apply(module)
    data = DataLoader(TensorDataset(torch.randint(0, 11, (8,)), torch.randint(0, 11, (8,))), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LowRankCallback(SST(rank=4), verbose=False)])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"'net\.body\.0' is a LoRALinear.*SST produces only SpectralLinear"):
        trainer.fit(module, data)
    assert trainer.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
