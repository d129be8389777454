"""Export of a trained reranker and a first stage into a model folder (``model_dir`` format, only trained
weights): one function for every reranker kind; what differs between kinds is a row of ``RECIPES``."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from edje_qdrant.errors import ModelError
from edje_qdrant.models import model_dir
from edje_qdrant.models.flickr8k_preset import NAME
from edje_qdrant.models.full_joint import FullJointReranker, init_full_joint_from_minilm, minilm_full_joint_config
from edje_qdrant.models.kinds import reranker_class
from edje_qdrant.train import edje, first_stage, split_reranker

RunConfig = dict[str, Any]


def _fresh_edje() -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """An untrained full-joint reranker (ranks exactly like the first stage) as a run config and weights."""
    model = FullJointReranker(minilm_full_joint_config())
    init_full_joint_from_minilm(model)
    return {"reranker": minilm_full_joint_config().to_dict(), "options": {"residual": True}}, model.trainable_state()


def _split_fields(run: RunConfig) -> dict[str, Any]:
    return {"token_layers": list(run["options"]["layers"]),
            "reranker_training": {k: run[k] for k in ("options", "steps", "best_step", "fusion_gain",
                                                      "train_seconds", "pairs_per_second") if k in run}}


@dataclass(frozen=True)
class ExportRecipe:
    """How a kind's training run is read: its weights and config files, the multiplier of the first-stage fusion
    weight, extra config.json fields, the model-folder version and an untrained stand-in for a missing run."""

    weights: str
    config: str
    fusion_gain: Callable[[RunConfig], float]
    fields: Callable[[RunConfig], dict[str, Any]] = lambda run: {}
    version: int | None = None
    untrained: Callable[[], tuple[RunConfig, dict[str, torch.Tensor]]] | None = None


RECIPES = {
    "edje": ExportRecipe(edje.WEIGHTS, edje.CONFIG, lambda run: 1.0 if run["options"]["residual"] else 0.0,
                         untrained=_fresh_edje),
    "split": ExportRecipe(split_reranker.WEIGHTS, split_reranker.CONFIG,
                          lambda run: float(run.get("fusion_gain", 1.0)), _split_fields, version=3),
}


def export_model(kind: str, run: str | Path, preset_dir: str | Path, first_stage_from: str | Path,
                 metrics: dict[str, Any] | None = None) -> Path:
    """Write a model folder into ``preset_dir``: the ``kind`` reranker trained in the folder ``run`` (a missing
    one exported untrained where the kind has a stand-in) and the first stage of ``first_stage_from`` (a first-stage
    training folder or a model folder). The fusion weight is the first stage's logit scale times the kind's gain."""
    reranker_class(kind, "export")  # a known kind
    if kind not in RECIPES:
        raise ModelError(f"export: no export recipe for reranker kind {kind!r}")
    recipe, run = RECIPES[kind], Path(run)
    config, parts, first_stage_weight = _first_stage(Path(first_stage_from))
    if (run / recipe.weights).is_file():
        run_config, weights = json.loads((run / recipe.config).read_text()), load_file(str(run / recipe.weights))
    elif recipe.untrained is not None:
        run_config, weights = recipe.untrained()
    else:
        raise ModelError(f"{run}: no trained {kind} reranker ({recipe.weights})")
    config["fusion"] = {"first_stage_weight": first_stage_weight * recipe.fusion_gain(run_config)}
    update: dict[str, Any] = {"version": recipe.version} if recipe.version is not None else {}
    update["reranker"] = {**run_config["reranker"], "kind": kind}
    update.update(recipe.fields(run_config))
    update["metrics"] = metrics or {}
    config.update(update)
    return model_dir.write(Path(preset_dir), config, {**parts, "reranker": weights})


def _first_stage(source: Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], float]:
    """(config.json fields, weight parts, logit scale) of the first stage in a training folder or a model folder."""
    if (source / first_stage.CONFIG).is_file():
        trained = json.loads((source / first_stage.CONFIG).read_text())
        config = {"preset": NAME, "clip_dim": trained["clip_dim"], "text_train_layers": trained["train_layers"],
                  "reranker": {}, "fusion": {}, "first_stage": dict(trained)}  # reranker, fusion: set by the caller
        return config, first_stage_parts(source), float(trained["logit_scale"])
    if not (source / model_dir.CONFIG_FILE).is_file():
        raise ModelError(f"{source}: neither a first-stage training folder ({first_stage.CONFIG}) nor a model folder "
                         f"({model_dir.CONFIG_FILE}); train one with `edje-qdrant train first --out {source}` or "
                         f"pass --first-stage FOLDER")
    source_config = model_dir.read_config(source)
    source_file = model_dir.weights_file(source)
    if source_file is None:
        raise ModelError(f"{source}: no weights file; pass the model folder whose first stage to keep")
    config = {k: v for k, v in source_config.items() if k not in ("reranker", "metrics")}
    weight = source_config.get("first_stage", {}).get("logit_scale", source_config["fusion"]["first_stage_weight"])
    return config, model_dir.read_weights(source_file), float(weight)


def first_stage_parts(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The trained first stage of a training folder as model-folder parts (text tower, vision head)."""
    parts: dict[str, dict[str, torch.Tensor]] = {"text": {}, "vision": {}}
    for key, t in load_file(str(out / first_stage.WEIGHTS)).items():
        if key.startswith("text."):
            parts["text"][key[len("text."):]] = t
        elif key.startswith("image."):
            parts["vision"]["head." + key[len("image."):]] = t
    return parts
