"""Lightning callbacks that apply strategies, schedule their operations and monitor ranks."""

from lr_lightning.callbacks.lowrank import LowRankCallback, fit_in_stages, shrink_
from lr_lightning.callbacks.rank_monitor import RankMonitor

__all__ = ["LowRankCallback", "RankMonitor", "fit_in_stages", "shrink_"]
