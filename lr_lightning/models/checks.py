"""Argument checks every image classifier shares."""

from __future__ import annotations


def check_classifier_shape(num_classes: int, in_channels: int) -> None:
    """Raise ``ValueError`` naming the argument unless ``num_classes >= 2`` and ``in_channels >= 1``."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
