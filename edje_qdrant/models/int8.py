"""int8 copies of a joint encoder for CPU inference (``EdjeModel.precision == "int8"``)."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic


def int8_copy(module: nn.Module, part: str) -> nn.Module:
    """A CPU eval copy of ``module`` whose submodule ``part`` (a dotted name, e.g. ``"bert.encoder"``) has its
    Linear layers dynamically quantized to int8 (per-channel weights, activations quantized per batch); the rest
    stays float32. The original is left untouched."""
    quantized = copy.deepcopy(module).to("cpu").eval()
    owner_name, _, name = part.rpartition(".")
    owner = quantized.get_submodule(owner_name) if owner_name else quantized
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao
        setattr(owner, name, quantize_dynamic(getattr(owner, name), {nn.Linear: per_channel_dynamic_qconfig},
                                              dtype=torch.qint8))
    return quantized
