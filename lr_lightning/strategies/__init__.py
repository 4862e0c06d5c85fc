"""Low-rank training methods as interchangeable strategy objects."""

from lr_lightning.strategies.base import LayerRow, LowRankStrategy, StrategyReport, strategy_from_config
from lr_lightning.strategies.full_rank import FullRank
from lr_lightning.strategies.inrank import InRank
from lr_lightning.strategies.lora import LoRA
from lr_lightning.strategies.relora import ReLoRA
from lr_lightning.strategies.sst import SST
from lr_lightning.strategies.svd_training import SVDTraining
from lr_lightning.strategies.tdlrt import TDLRT, BUGOptimizer

__all__ = ["LowRankStrategy", "LayerRow", "StrategyReport", "strategy_from_config", "FullRank", "LoRA", "ReLoRA", "SST",
           "InRank", "TDLRT", "BUGOptimizer", "SVDTraining"]
