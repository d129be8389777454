"""Device and precision choice, one rule for serving and training.

``"auto"`` precision means bf16 where the hardware runs it natively (a CUDA GPU with bf16, or a CPU with AMX or
AVX512-BF16 units, where it measured 2-3.5x faster than fp32) and fp32 elsewhere (CPUs without bf16 units ran
bf16 3-4x slower). ``load_model`` defaults to fp32 on the CPU so scores are exact and reproducible; training
defaults to ``"auto"``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from edje_qdrant.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Explicit device (checked), else cuda when available, else cpu."""
    if device is None or device == "auto" or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r} is not a torch device (use cpu, cuda, cuda:0, mps)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """"fp32" or "bf16" for ``precision`` ("auto" | "fp32" | "bf16"; None = fp32 on the CPU, auto elsewhere)."""
    if precision is None:
        precision = "fp32" if device.type == "cpu" else "auto"
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
