"""Lightning callbacks that apply strategies, schedule their operations and monitor ranks."""

from lr_lightning.callbacks.lowrank import LowRankCallback
from lr_lightning.callbacks.rank_monitor import RankMonitor

__all__ = ["LowRankCallback", "RankMonitor"]
