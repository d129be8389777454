"""Layers built without random initialisation, for modules whose every weight is replaced from a file right after
(``bert_lite``, ``dinov2_lite``): building a tower then costs no random numbers and no time."""
from __future__ import annotations

from torch import nn


class SkipInit:
    """Mixed in before a torch layer: its ``reset_parameters`` (the random initialisation) does nothing."""

    def reset_parameters(self) -> None:
        pass


Linear, Embedding, LayerNorm, Conv2d = (type(layer.__name__, (SkipInit, layer), {"__module__": __name__})
                                        for layer in (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Conv2d))
