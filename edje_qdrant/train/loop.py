"""The one training loop of every stage (first stage, split reranker, full EDJE reranker).

A stage brings its batches, its loss and, optionally, an evaluation (a ``Stage``); the loop owns the rest:
learning-rate schedule, bf16 autocast, optimizer steps with optional gradient clipping, evaluation every N steps
with best-state tracking, checkpoints that resume (model, optimizer, step, RNG states), a time limit, the
progress bar and JSON log lines.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from edje_qdrant.train import checkpoint
from edje_qdrant.train.common import autocast

log = logging.getLogger(__name__)
Losses = dict[str, torch.Tensor]


def no_epoch(step: int) -> int:
    """The epoch a stage without epochs writes into its checkpoints."""
    return 0


@dataclass
class Stage:
    """What a stage gives the loop. ``batch(step)`` draws the step's batch (outside autocast), ``forward(batch)``
    returns (loss to minimise, named parts for the bar and history); ``lr_scale(step)`` multiplies each optimizer
    group's ``base_lr``; ``save_state()`` / ``load_state(model_state, extra)`` move the model part of a checkpoint.
    """

    name: str
    optimizer: torch.optim.Optimizer
    total_steps: int
    batch: Callable[[int], Any]
    forward: Callable[[Any], tuple[torch.Tensor, Losses]]
    lr_scale: Callable[[int], float]
    checkpoint_path: Path
    checkpoint_every: int
    save_state: Callable[[], dict[str, torch.Tensor]]
    load_state: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]
    device: torch.device = torch.device("cpu")
    bf16: bool = False  # autocast ``forward`` to bf16 (a stage that autocasts only part of it passes False)
    clip_norm: float | None = None
    after_backward: Callable[[int], None] | None = None  # e.g. drop the gradients of frozen groups
    postfix: Callable[[Losses], dict[str, str]] = lambda parts: {}
    steps_per_epoch: int = 0  # > 0: also checkpoint at the end of each epoch
    epoch_of: Callable[[int], int] = no_epoch  # epoch written into the checkpoint after ``step`` steps
    extra: Callable[[], dict[str, Any]] = dict  # stage fields of the checkpoint's ``extra``
    keep_history: bool = False  # checkpoint the last 200 steps' losses (``extra["history"]``)
    time_limit_s: float | None = None  # stop cleanly (checkpoint) after this many seconds of this run
    evaluation: Evaluation | None = None


@dataclass
class Evaluation:
    """Evaluation on a held-back set every ``every`` steps, at the start and at the end; the loop keeps the state
    (``snapshot()``) of the best ``score`` (the starting point competes too)."""

    run: Callable[[], dict[str, float]]
    every: int
    score: Callable[[dict[str, float]], float]
    snapshot: Callable[[], Any]


@dataclass
class Progress:
    """Where a run stands: steps done, per-step losses, the evaluation curve and the best state so far."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    curve: list[dict[str, float]] = field(default_factory=list)
    best: float = -1.0
    best_state: Any = None
    best_step: int = 0
    seconds: float = 0.0


class TrainingLoop:
    """Runs a ``Stage`` to ``total_steps``; ``run()`` returns its ``Progress``."""

    def __init__(self, stage: Stage, *, resume: bool = False, progress: bool = True) -> None:
        self.stage, self.resume, self.show_progress = stage, resume, progress
        self.state = Progress()

    def run(self) -> Progress:
        stage, state = self.stage, self.state
        if self.resume and stage.checkpoint_path.is_file():
            self._restore()
        if stage.evaluation is not None:
            self._evaluate(first=True)
        bar = self._bar()
        start = time.time()
        while state.step < stage.total_steps:
            if stage.time_limit_s is not None and time.time() - start > stage.time_limit_s:
                log.info("time limit reached at step %d; resume later with resume=True", state.step)
                self.save()
                break
            parts = self._step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stage.postfix(parts))
            self._after_step()
        if bar is not None:
            bar.close()
        state.seconds = time.time() - start
        log.info("%s", json.dumps({"stage": stage.name, "event": "end", "step": state.step,
                                   "seconds": round(state.seconds, 1)}))
        return state

    def _step(self) -> Losses:
        stage, state = self.stage, self.state
        batch = stage.batch(state.step)
        scale = stage.lr_scale(state.step)
        for group in stage.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale
        with autocast(stage.device, stage.bf16):
            loss, parts = stage.forward(batch)
        stage.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if stage.after_backward is not None:
            stage.after_backward(state.step)
        if stage.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in stage.optimizer.param_groups for p in g["params"]],
                                           stage.clip_norm)
        stage.optimizer.step()
        state.step += 1
        if stage.keep_history:
            state.history.append({k: round(float(v.detach()), 4) for k, v in parts.items()} | {"step": state.step})
        return parts

    def _after_step(self) -> None:
        stage, step = self.stage, self.state.step
        last = step == stage.total_steps
        evaluation = stage.evaluation
        if evaluation is not None and (step % evaluation.every == 0 or last):
            self._evaluate()
        epoch_end = stage.steps_per_epoch > 0 and step % stage.steps_per_epoch == 0
        if step % stage.checkpoint_every == 0 or last or epoch_end:
            self.save()

    def _evaluate(self, first: bool = False) -> None:
        evaluation, state = self.stage.evaluation, self.state
        assert evaluation is not None
        values = evaluation.run()
        state.curve.append({"step": state.step, **values})
        log.info("%s", json.dumps({"stage": self.stage.name, "event": "eval", "step": state.step, **values}))
        score = evaluation.score(values)
        if first and state.best < 0:  # a fresh run: an update that never beats the start is not kept
            state.best, state.best_state = score, evaluation.snapshot()
        elif not first and score > state.best:
            state.best, state.best_state, state.best_step = score, evaluation.snapshot(), state.step

    def save(self) -> None:
        """Write the checkpoint: the stage's model state, optimizer, step, epoch, RNG states, extra fields."""
        stage, state = self.stage, self.state
        extra = dict(stage.extra())
        if stage.keep_history:
            extra["history"] = json.dumps(state.history[-200:])
        if stage.evaluation is not None:
            extra["best"] = state.best
        checkpoint.save_checkpoint(stage.checkpoint_path, model=stage.save_state(),
                                   optimizer=stage.optimizer.state_dict(), step=state.step,
                                   epoch=stage.epoch_of(state.step), extra=extra)

    def _restore(self) -> None:
        stage, state = self.stage, self.state
        saved = checkpoint.load_checkpoint(stage.checkpoint_path)
        extra = saved.get("extra") if isinstance(saved.get("extra"), dict) else {}
        stage.load_state(saved["model"], extra)
        stage.optimizer.load_state_dict(saved["optimizer"])
        state.step = saved["step"]
        checkpoint.set_rng_state(saved["rng"])
        if stage.keep_history:
            state.history = json.loads(extra.get("history", "[]"))
        if stage.evaluation is not None:
            state.best = float(extra.get("best", -1.0))
        log.info("resumed %s at step %d", stage.name, state.step)

    def _bar(self) -> Any:
        if not self.show_progress:
            return None
        from tqdm import tqdm  # cost: only runs that draw a bar load it

        return tqdm(total=self.stage.total_steps, initial=self.state.step, desc=self.stage.name, unit="step")
