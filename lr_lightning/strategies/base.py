"""``LowRankStrategy``: which modules a method converts, how, and what it does to them over training.

A strategy is plain configuration plus math. It selects modules by glob patterns (like peft's
``target_modules``), converts them into factorized layers, reports their sizes, builds optimizer
parameter groups, and names its operations (a ReLoRA merge, an SST resample) and when they are due.
Running them at the right time, and everything the optimizer needs around them, is the job of
:class:`lr_lightning.callbacks.LowRankCallback`.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import functools
import importlib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lr_lightning.layers.base import LowRankLayer
from lr_lightning.optim import StateEdit

HEAD_NAMES = ("lm_head", "head", "output_projection", "classifier")
"""Leaf names treated as the output head, which ``target_modules=None`` leaves dense."""

WEIGHT_READERS: dict[type[nn.Module], tuple[tuple[str, ...], str]] = {
    nn.MultiheadAttention: (
        ("out_proj",),
        "nn.MultiheadAttention passes out_proj.weight to its functional attention and never calls out_proj.forward"),
    nn.TransformerEncoderLayer: (
        ("linear1", "linear2"),
        "nn.TransformerEncoderLayer's eval fast path passes linear1.weight and linear2.weight to "
        "torch._transformer_encoder_layer_fwd instead of calling their forward"),
}
"""Modules (and their subclasses) that read some children's ``.weight`` directly instead of calling them: the
children's names, and why. A factorized layer there would be bypassed (LoRA's factors would never train, eval would
differ from train) or crash (no ``weight``), so selection leaves those children dense. Add an entry for another
module that does so. ``nn.TransformerDecoderLayer`` calls ``linear1``/``linear2`` through forward; its attentions'
``out_proj`` are covered by the ``nn.MultiheadAttention`` entry."""

DECAY_ROLES = frozenset({"dense", "factor", "base", "core"})
"""Parameter roles that receive weight decay; the rest (bias, frozen, basis, spectrum) get none."""


def resolve_rank(rank: int | float, out_features: int, in_features: int, layer: str) -> int:
    """An int rank as given, or a float fraction of ``min(m, n)`` rounded (at least 1)."""
    full = min(out_features, in_features)
    resolved = max(1, round(rank * full)) if isinstance(rank, float) else rank
    if not 1 <= resolved <= full:
        raise ValueError(
            f"rank={rank} is too large for layer '{layer}' of shape ({out_features}, {in_features}): "
            f"allowed ranks are 1..{full} (min(m, n)) or a fraction in (0, 1]"
        )
    return resolved


def layer_generator(seed: int, index: int, draw: int = 0) -> torch.Generator:
    """The CPU generator of layer ``index``'s ``draw``-th random draw: the same on every process."""
    return torch.Generator().manual_seed(seed * 1_000_003 + draw * 10_007 + index)


def check_rank_argument(rank: int | float, name: str = "rank") -> None:
    """Reject a rank that is neither a positive int nor a fraction in (0, 1]."""
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"{name} must be an int >= 1 or a float in (0, 1], got {rank!r}")
    if isinstance(rank, int) and rank < 1 or isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"{name} must be an int >= 1 or a float in (0, 1], got {rank!r}")


@dataclass
class LayerRow:
    """One converted (or targeted) layer in a :class:`StrategyReport`."""

    name: str
    shape: tuple[int, int]
    rank: int
    capacity: int
    trainable: int
    dense: int


@dataclass
class StrategyReport:
    """Per-layer ranks and parameter counts of a converted model; ``str()`` is a table."""

    strategy: str
    rows: list[LayerRow]
    model_trainable: int
    model_total: int

    @property
    def trainable(self) -> int:
        return sum(r.trainable for r in self.rows)

    @property
    def dense(self) -> int:
        return sum(r.dense for r in self.rows)

    @property
    def ratio(self) -> float:
        """Trainable parameters of the targeted layers over their dense parameter count."""
        return self.trainable / max(self.dense, 1)

    def __str__(self) -> str:
        header = ("layer", "shape", "rank", "capacity", "trainable", "dense")
        lines = [(r.name, f"{r.shape[0]}x{r.shape[1]}", str(r.rank), str(r.capacity),
                  f"{r.trainable:,}", f"{r.dense:,}") for r in self.rows]
        lines.append(("total", "", "", "", f"{self.trainable:,}", f"{self.dense:,}"))
        widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
        fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
        rule = "-" * len(fmt(header))
        return "\n".join([
            f"{self.strategy}: {len(self.rows)} layers",
            fmt(header), rule, *map(fmt, lines[:-1]), rule, fmt(lines[-1]),
            f"trainable / dense in these layers: {self.ratio:.2%}; "
            f"whole model: {self.model_trainable:,} trainable of {self.model_total:,} parameters",
        ])


class RunState:
    """A strategy attribute that belongs to the run (ReLoRA's merge count, SVD training's stage).

    Declared once as a class attribute, ``merges = RunState(0)``: each instance starts from its own copy
    of ``default``, and :meth:`LowRankStrategy.state_dict` saves it in every checkpoint, so a resumed run
    continues from it.
    """

    def __init__(self, default: Any) -> None:
        self.default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, strategy: Any, owner: type | None = None) -> Any:
        if strategy is None:
            return self
        return strategy.__dict__.setdefault(self.name, copy.deepcopy(self.default))

    def __set__(self, strategy: Any, value: Any) -> None:
        strategy.__dict__[self.name] = value


def records_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a strategy's ``__init__`` so the outermost call stores its arguments as ``init_args``.

    Defaults are filled in and ``**kwargs`` are flattened into the names they were passed under, so
    ``type(s)(**s.init_args)`` rebuilds ``s`` for any subclass, whatever it stores as attributes.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def recording_init(self: LowRankStrategy, *args: Any, **kwargs: Any) -> None:
        if "init_args" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments: dict[str, Any] = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_POSITIONAL and value:
                    raise TypeError(f"{type(self).__name__}(...) got positional arguments {value} for *{name}: "
                                    "pass them by name, so checkpoints can rebuild the strategy")
                if kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)
                elif kind is not inspect.Parameter.VAR_POSITIONAL:
                    arguments[name] = value
            self.__dict__["init_args"] = copy.deepcopy(arguments)
        init(self, *args, **kwargs)

    return recording_init


class LowRankStrategy:
    """Base class of every low-rank training method.

    A new method is a layer (a :class:`~lr_lightning.layers.base.LowRankLayer` in ``lr_lightning/layers``)
    and a subclass of this class; it writes:

    - ``convert(name, module, index)``: the layer that replaces a selected module (``module_types``
      and ``handles`` say which modules can be selected).
    - ``layer_types``: the :class:`~lr_lightning.layers.base.LowRankLayer` classes ``convert`` returns. A layer of
      another class found in the model was built by another strategy, and :meth:`select` refuses it (two methods on
      one model would train and report each other's layers); strategies producing the same class (LoRA and ReLoRA:
      ``LoRALinear``) may be applied over each other, and the layers keep how they were built.
    - One method per operation, ``op(model, step) -> list[StateEdit]`` (the optimizer-state resets or
      transports the operation calls for), listed with its period in :meth:`operations`, and the
      schedule: :meth:`should_update` (after optimizer steps) and/or :meth:`should_update_at_epoch_end`
      return the names of the operations due. ``should_update`` only decides; it changes nothing.
    - Where the method needs them: :meth:`before_optimizer_step` (gradient edits),
      :meth:`after_optimizer_step` (projections), :meth:`lr_multiplier` (re-warmups),
      :meth:`param_groups`, :meth:`wrap_optimizer` (several passes per step), :meth:`layers_to_shrink`
      and :meth:`metrics`.
    - Run state as :class:`RunState` class attributes; never a hand-written ``state_dict``.

    Constructor arguments are recorded automatically (:attr:`init_args`), so ``to_config``, ``repr`` and
    checkpoints work for any subclass. :class:`~lr_lightning.callbacks.LowRankCallback` keeps the rest of
    the contract for any LightningModule; nothing else needs to know the method.

    Args:
        target_modules: Glob patterns on qualified module names (``"*.attn.*"``). ``None`` selects
            every convertible module except the output head (a layer named one of ``HEAD_NAMES`` or
            whose weight is tied to an embedding) and the layers whose parent reads their ``.weight``
            directly (``WEIGHT_READERS``: ``nn.MultiheadAttention.out_proj``, ``nn.TransformerEncoderLayer``'s
            ``linear1``/``linear2``), which it leaves dense with one warning naming them. Each pattern must
            match at least one module; selecting a weight-read layer or a layer tied to an embedding this
            way is an error (exclude it).
        exclude_modules: Glob patterns of modules never converted.
    """

    module_types: tuple[type[nn.Module], ...] = (nn.Linear,)
    """Module classes this strategy converts (each must have a 2-D ``weight``)."""

    layer_types: tuple[type[LowRankLayer], ...] = (LowRankLayer,)
    """The :class:`~lr_lightning.layers.base.LowRankLayer` classes ``convert`` produces (none: a strategy that
    converts nothing, such as ``FullRank``); any other ``LowRankLayer`` in the model is foreign to it. The
    default accepts every layer: a new method declares its own to have another method's layers refused."""

    init_args: dict[str, Any]
    """The constructor's arguments, defaults included (recorded by the outermost ``__init__``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = records_arguments(cls.__dict__["__init__"])  # type: ignore[method-assign]

    @records_arguments
    def __init__(self, target_modules: list[str] | None = None, exclude_modules: list[str] | None = None) -> None:
        for arg, value in (("target_modules", target_modules), ("exclude_modules", exclude_modules)):
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
                raise TypeError(f"{arg} must be a list of glob patterns such as ['*.attn.*'], got {value!r}")
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.exclude_modules = list(exclude_modules) if exclude_modules is not None else None

    # ----------------------------------------------------------------------------- conversion
    def convert(self, name: str, module: nn.Module, index: int) -> nn.Module:
        """Return the replacement of ``module`` (the ``index``-th selected layer, named ``name``)."""
        raise NotImplementedError

    def handles(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer this strategy can convert."""
        weight = getattr(module, "weight", None)
        return isinstance(module, self.module_types) and torch.is_tensor(weight) and weight.dim() == 2

    def select(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs to convert, or already converted, in registration order.

        Raises a ``ValueError``, before anything changes, for a layer converted by another strategy
        (not one of :attr:`layer_types`), and for an explicitly targeted layer that cannot be served:
        one whose parent reads its ``.weight`` directly (``WEIGHT_READERS``) or whose weight is tied to
        an ``nn.Embedding``. ``target_modules=None`` leaves those dense instead.
        """
        candidates = self._candidates(model)
        for name, module in candidates:
            if isinstance(module, LowRankLayer) and not isinstance(module, self.layer_types):
                raise ValueError(self._foreign_layer_message(name, module))
        embeddings = self._embedding_weights(model)
        readers = self._weight_read(model)
        selected = self._excluded(self._targeted(model, candidates, embeddings))
        if self.target_modules is not None:
            self._refuse_unservable(selected, readers, embeddings)
        else:
            selected = self._without_read_weights(selected, readers)
        if not selected:
            raise ValueError(f"{type(self).__name__} selected no module to convert: every candidate was "
                             f"excluded (exclude_modules={self.exclude_modules}) or is read directly by its "
                             f"parent (see WEIGHT_READERS)")
        return selected

    def _targeted(self, model: nn.Module, candidates: list[tuple[str, nn.Module]],
                  embeddings: dict[int, str]) -> list[tuple[str, nn.Module]]:
        """The candidates ``target_modules`` matches (each pattern must match one), or all but the head."""
        if self.target_modules is None:
            return [(n, m) for n, m in candidates if not self._is_head(model, n, m, embeddings)]
        names = [n for n, _ in candidates]
        for pattern in self.target_modules:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(self._no_match_message(model, pattern, names))
        return [(n, m) for n, m in candidates if any(fnmatch.fnmatchcase(n, p) for p in self.target_modules)]

    def _excluded(self, selected: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
        """``selected`` without the ``exclude_modules`` matches (warning about a pattern that matches none)."""
        patterns = self.exclude_modules or []
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in selected):
                warnings.warn(f"exclude_modules pattern '{pattern}' matched no selected module", stacklevel=3)
        return [(n, m) for n, m in selected if not any(fnmatch.fnmatchcase(n, p) for p in patterns)]

    def _refuse_unservable(self, selected: list[tuple[str, nn.Module]], readers: dict[str, str],
                           embeddings: dict[int, str]) -> None:
        """Raise for an explicitly targeted layer whose parent reads its ``.weight`` or whose weight is tied."""
        for name, module in selected:
            if name in readers:
                raise ValueError(f"{type(self).__name__} cannot convert '{name}': {readers[name]}, so a "
                                 f"factorized layer there would be bypassed; leave it dense (drop it from "
                                 f"target_modules or add it to exclude_modules)")
            tied = embeddings.get(id(getattr(module, "weight", None)))
            if tied is not None:
                raise ValueError(f"{type(self).__name__} cannot convert '{name}': its weight is tied to the "
                                 f"nn.Embedding '{tied}', and a factorized layer would break the tie; leave it "
                                 f"dense (drop it from target_modules or add it to exclude_modules)")

    def _without_read_weights(self, selected: list[tuple[str, nn.Module]],
                              readers: dict[str, str]) -> list[tuple[str, nn.Module]]:
        """``selected`` without the layers whose parent reads their ``.weight``, with one warning naming them."""
        by_reason: dict[str, list[str]] = {}
        for name, _ in selected:
            if name in readers:
                by_reason.setdefault(readers[name], []).append(f"'{name}'")
        if by_reason:
            count = sum(len(names) for names in by_reason.values())
            warnings.warn(f"{type(self).__name__} leaves {count} layers dense because their parent reads "
                          f"their .weight directly instead of calling them: "
                          + "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items()),
                          stacklevel=3)
        return [(n, m) for n, m in selected if n not in readers]

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert the selected modules in place and return ``model``. Idempotent.

        All replacements are built before any is installed, so a bad rank leaves the model as it was.
        """
        pending = [(i, name, module) for i, (name, module) in enumerate(self.select(model))
                   if not isinstance(module, LowRankLayer)]
        replacements = [(name, self.convert(name, module, i)) for i, name, module in pending]
        for name, new in replacements:
            if new is not model.get_submodule(name):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent), leaf, new)
        return model

    def layers(self, model: nn.Module) -> list[tuple[str, LowRankLayer]]:
        """The converted layers of ``model``."""
        return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLayer)]

    def _candidates(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        inside_layer: list[str] = []
        found = []
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in inside_layer):
                continue
            if isinstance(module, LowRankLayer):
                inside_layer.append(name)
                found.append((name, module))
            elif self.handles(module):
                found.append((name, module))
        return found

    @staticmethod
    def _embedding_weights(model: nn.Module) -> dict[int, str]:
        """``id`` of every ``nn.Embedding``'s weight in ``model``, and the embedding's name."""
        return {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}

    @staticmethod
    def _is_head(model: nn.Module, name: str, module: nn.Module, embeddings: dict[int, str] | None = None) -> bool:
        if embeddings is None:
            embeddings = LowRankStrategy._embedding_weights(model)
        return name.rpartition(".")[2] in HEAD_NAMES or id(getattr(module, "weight", None)) in embeddings

    @staticmethod
    def _weight_read(model: nn.Module) -> dict[str, str]:
        """The qualified names of the children whose parent reads their ``.weight`` directly, and why."""
        found = {}
        for name, module in model.named_modules():
            for cls, (children, reason) in WEIGHT_READERS.items():
                if isinstance(module, cls):
                    found.update({f"{name}.{child}" if name else child: reason for child in children})
        return found

    def _foreign_layer_message(self, name: str, layer: LowRankLayer) -> str:
        own = ", ".join(t.__name__ for t in self.layer_types)
        produces = f"produces only {own}" if own else "converts nothing"
        return (f"'{name}' is a {type(layer).__name__}, converted by another strategy; {type(self).__name__} "
                f"{produces} (layer_types), so it would train and report that layer as its own: apply one "
                f"strategy per model, starting from the dense model")

    def _no_match_message(self, model: nn.Module, pattern: str, names: list[str]) -> str:
        close = difflib.get_close_matches(pattern.replace("*", ""), names, n=5, cutoff=0.3) or names[:5]
        others = [n for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pattern)]
        hint = (f" It matches {others[:3]}, which {type(self).__name__} cannot convert "
                f"(it converts {[t.__name__ for t in self.module_types]})." if others else "")
        return (f"target_modules pattern '{pattern}' matched no convertible module.{hint} "
                f"Convertible modules include: {close}")

    # ----------------------------------------------------------------------------- reporting
    def report(self, model: nn.Module) -> StrategyReport:
        """Per-layer rank, capacity, trainable and dense parameter counts of the selected layers."""
        rows = []
        for name, module in self.select(model):
            if isinstance(module, LowRankLayer):
                rows.append(LayerRow(name, (module.out_features, module.in_features), module.rank,
                                     module.capacity, module.trainable_numel(), module.dense_numel()))
            else:
                m, n = module.weight.shape[0], module.weight[0].numel()
                bias = getattr(module, "bias", None)
                dense = m * n + (bias.numel() if bias is not None else 0)
                trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
                rows.append(LayerRow(name, (m, n), min(m, n), min(m, n), trainable, dense))
        params = {id(p): p for p in model.parameters()}.values()
        return StrategyReport(type(self).__name__, rows,
                              sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))

    # ----------------------------------------------------------------------------- optimization
    def param_groups(self, model: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
        """Optimizer parameter groups tagged with ``lowrank_role``.

        Roles come from the converted layers (``factor``, ``frozen``, ``basis``, ...); other
        parameters are ``dense`` (2-D and more) or ``bias`` (1-D: biases, norms). Roles outside
        ``DECAY_ROLES`` get ``weight_decay=0``; the decayed groups take ``weight_decay`` if given,
        else the optimizer's default. Frozen parameters are left out.
        """
        roles: dict[int, str] = {}
        for _, layer in self.layers(model):
            for pname, p in layer.named_parameters(recurse=False):
                roles[id(p)] = layer.roles.get(pname, "factor")
        groups: dict[str, list[torch.Tensor]] = {}
        seen: set[int] = set()
        for p in model.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            role = roles.get(id(p), "dense" if p.dim() >= 2 else "bias")
            groups.setdefault(role, []).append(p)
        result = []
        for role, params in groups.items():
            group: dict[str, Any] = {"params": params, "lowrank_role": role}
            if role not in DECAY_ROLES:
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group["weight_decay"] = weight_decay
            result.append(group)
        return result

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer a task should step: ``optimizer`` itself unless the method needs several passes
        per step (TDLRT's faithful integrator wraps it)."""
        return optimizer

    def check_run(self, accumulate_grad_batches: int, precision: str) -> None:
        """Raise a ``ValueError`` naming the setting if the method cannot train with these trainer settings
        (``LowRankCallback`` asks at fit start, before any step)."""

    def lr_multiplier(self, step: int, role: str) -> float:
        """Factor on the learning rate of ``role`` parameters after ``step`` optimizer steps. When a method
        overrides it, :class:`~lr_lightning.callbacks.LowRankCallback` applies it inside every optimizer step
        (:class:`~lr_lightning.optim.RoleOptimizer`), on top of the module's own schedule."""
        return 1.0

    # ----------------------------------------------------------------------------- operations
    def operations(self, model: nn.Module) -> dict[str, int | None]:
        """Each operation's name and its period on ``model`` in optimizer steps (``None``: it runs once)."""
        return {}

    def should_update(self, step: int) -> list[str]:
        """The operations due once ``step`` optimizer steps have completed, in the order they run."""
        return []

    def should_update_at_epoch_end(self, epoch: int) -> list[str]:
        """The operations due once training epoch ``epoch`` (0-based) has ended."""
        return []

    def operations_to_finish(self, step: int) -> list[str]:
        """The operations that complete a cycle a run stopped inside of after ``step`` optimizer steps. Training never
        runs them (a resumed run must continue the cycle); run them before reporting or exporting a finished run."""
        return []

    def run(self, model: nn.Module, operations: list[str], step: int) -> list[StateEdit]:
        """Run the named operations in order after ``step`` optimizer steps; return their optimizer-state edits."""
        known = self.operations(model)
        edits: list[StateEdit] = []
        for name in operations:
            if name not in known:
                raise ValueError(f"{type(self).__name__} has no operation {name!r}; its operations: {list(known)}")
            edits += getattr(self, name)(model, step)
        return edits

    def update(self, model: nn.Module, step: int) -> list[StateEdit]:
        """Run the operations due after ``step`` optimizer steps (``run(model, should_update(step), step)``)."""
        return self.run(model, self.should_update(step), step)

    def before_optimizer_step(self, model: nn.Module, step: int) -> list[StateEdit]:
        """Edit gradients after backward and AMP unscaling, before clipping and optimizer step ``step + 1``.

        Returns optimizer-state edits to apply before that step (for an operation that changes a basis
        from the fresh gradients).
        """
        return []

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Project the parameters after optimizer step ``step`` (runs every step, before ``update``)."""

    def layers_to_shrink(self, model: nn.Module) -> list[tuple[str, LowRankLayer]]:
        """Layers whose rank is now final and below their capacity: the callback shrinks them to it.

        A method whose rank is fixed for good by a one-time event (SVD training's prune, InRank's
        switch) returns them from then on, so the parameters, gradients, optimizer state and work of
        the rest of training are those of a compact layer.
        """
        return []

    def metrics(self, model: nn.Module) -> dict[str, float]:
        """Scalars worth logging after an update (ranks, counts)."""
        ranks = [layer.rank for _, layer in self.layers(model)]
        return {"lowrank/total_rank": float(sum(ranks))} if ranks else {}

    # ----------------------------------------------------------------------------- checkpoint
    def run_state_names(self) -> list[str]:
        """The :class:`RunState` attributes of this strategy's class and its bases."""
        return [name for cls in reversed(type(self).__mro__) for name, value in vars(cls).items()
                if isinstance(value, RunState)]

    def state_dict(self) -> dict[str, Any]:
        """Every :class:`RunState` attribute's value (schedule position and other state outside the model)."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self.run_state_names()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; attributes a checkpoint lacks keep their value."""
        for name in self.run_state_names():
            if name in state:
                setattr(self, name, state[name])

    def to_config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` of this strategy (LightningCLI's format)."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": copy.deepcopy(self.init_args)}

    # ----------------------------------------------------------------------------- export
    def export(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with every converted layer replaced by its compact form."""
        compact = copy.deepcopy(model)
        for name, layer in self.layers(compact):
            parent, _, leaf = name.rpartition(".")
            setattr(compact.get_submodule(parent), leaf, layer.export())
        return compact

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config()["init_args"].items())
        return f"{type(self).__name__}({args})"


def strategy_from_config(config: dict[str, Any]) -> LowRankStrategy:
    """Rebuild a strategy from :meth:`LowRankStrategy.to_config` output."""
    module, _, name = config["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, LowRankStrategy)):
        raise TypeError(f"class_path {config['class_path']!r} is not a LowRankStrategy")
    return cls(**config.get("init_args", {}))

