"""Lightning data modules."""

from lr_lightning.data.graphs import Graph, GraphDataModule
from lr_lightning.data.images import ImageDataModule
from lr_lightning.data.links import LinkDataModule, LinkGraph
from lr_lightning.data.text import TextDataModule

__all__ = ["TextDataModule", "GraphDataModule", "Graph", "ImageDataModule", "LinkDataModule", "LinkGraph"]
