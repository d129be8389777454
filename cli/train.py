"""`edje-qdrant train`: one sub-command per stage (first, edje, split, crossfit) and `export`, each with its own
options. Training libraries load only when a sub-command runs (or its ``--set`` help is shown)."""
from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Callable

import click

from edje_qdrant.errors import InputError
from edje_qdrant.store.filters import split_key_value

from .options import library_errors, progress_option, show_progress

EDJE_OPTIONS = "edje_qdrant.train.edje:EdjeTrainOptions"
SPLIT_OPTIONS = "edje_qdrant.train.split_reranker:SplitTrainOptions"


class SettingsOption(click.Option):
    """``--set KEY=VALUE`` (repeatable) whose help names an options dataclass and lists its fields."""

    def __init__(self, *args: Any, options_class: str, reserved: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, multiple=True, metavar="KEY=VALUE", **kwargs)
        self.options_class, self.reserved = options_class, reserved

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        module, _, name = self.options_class.partition(":")
        fields = dataclasses.fields(getattr(importlib.import_module(module), name))  # cost: torch, for --help only
        names = ", ".join(f.name for f in fields if f.name not in self.reserved)
        self.help = f"Override one field of {module}.{name} (repeatable, JSON values): {names}."
        return super().get_help_record(ctx)


def settings(options_class: str, reserved: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--set", "settings", cls=SettingsOption, options_class=options_class, reserved=reserved)


def parse_settings(items: tuple[str, ...], reserved: dict[str, str]) -> dict[str, Any]:
    """``KEY=VALUE`` items -> {key: JSON value, or the raw string}; ``reserved`` keys name their own option."""
    options: dict[str, Any] = {}
    for item in items:
        key, raw = split_key_value(item, f"--set expects KEY=VALUE, got {item!r}")
        if key in reserved:
            raise InputError(f"--set {key}: use its own option ({reserved[key]})")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


def data_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--captions, --images, --out, --cache, --device, --precision, --resume and the progress bar."""
    for option in reversed([
        click.option("--captions", required=True, type=click.Path(dir_okay=False, path_type=Path),
                     help="Captions TSV (image, caption_idx, split, caption); trains on split 'train'."),
        click.option("--images", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Images folder."),
        click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Training folder (checkpoints, weights)."),
        click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Vision token cache folder (default: under the user cache dir)."),
        click.option("--device", envvar="EDJE_DEVICE", show_envvar=True, default=None, help="torch device."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True),
        click.option("--resume", is_flag=True, help="Continue from the last checkpoint in --out."),
        progress_option,
    ]):
        func = option(func)
    return func


@click.group()
def train() -> None:
    """Train the offline model on captioned images (resumable; checkpoints in --out): `first` (the LiT first
    stage), then a reranker on top of it (`edje` or `split`), then `export` a model folder."""


@train.command()
@data_options
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--text-layers", type=click.IntRange(min=0, max=6), default=2, show_default=True,
              help="How many top MiniLM layers are fine-tuned.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@library_errors
def first(captions: Path, images: Path, out: Path, cache: Path | None, device: str | None, precision: str,
          resume: bool, progress: bool | None, epochs: int, text_layers: int, batch_size: int) -> None:
    """The LiT first stage: frozen DINOv2, tuned MiniLM text tower, InfoNCE."""
    from edje_qdrant.train.first_stage import train_first_stage  # cost: torch, transformers

    click.echo(json.dumps(train_first_stage(captions, images, out, cache=cache, epochs=epochs, device=device,
                                            precision=precision, resume=resume, train_layers=text_layers,
                                            batch_size=batch_size, progress=show_progress(progress)), default=str))


@train.command()
@data_options
@click.option("--folds", type=click.IntRange(min=2), default=2, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--text-layers", type=click.IntRange(min=0, max=6), default=2, show_default=True,
              help="How many top MiniLM layers are fine-tuned.")
@library_errors
def crossfit(captions: Path, images: Path, out: Path, cache: Path | None, device: str | None, precision: str,
             resume: bool, progress: bool | None, folds: int, epochs: int, text_layers: int) -> None:
    """Cross-fitted first stages alone: --out/fold<f> trained without fold f (folds already trained are kept)."""
    from edje_qdrant.train.crossfit import train_crossfit  # cost: torch, transformers

    configs = train_crossfit(captions, images, out, folds=folds, cache=cache, epochs=epochs, train_layers=text_layers,
                             device=device, precision=precision, resume=resume, progress=show_progress(progress))
    click.echo(json.dumps(configs, default=str))


@train.command()
@data_options
@click.option("--steps", type=click.IntRange(min=1), default=400, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--time-limit", type=float, default=None,
              help="Stop cleanly after this many seconds (resume later with --resume).")
@settings(EDJE_OPTIONS, reserved=("steps", "batch_size", "time_limit_s"))
@library_errors
def edje(captions: Path, images: Path, out: Path, cache: Path | None, device: str | None, precision: str,
         resume: bool, progress: bool | None, steps: int, batch_size: int, time_limit: float | None,
         settings: tuple[str, ...]) -> None:
    """The full-joint EDJE reranker, on top of the first stage trained in --out."""
    from edje_qdrant.train.edje_run import train_reranker  # cost: torch, transformers

    options = parse_settings(settings, {"steps": "--steps", "batch_size": "--batch-size",
                                        "time_limit_s": "--time-limit"})
    limit = {"time_limit_s": time_limit} if time_limit else {}
    result = train_reranker(captions, images, out, cache=cache, steps=steps, batch_size=batch_size, device=device,
                            precision=precision, resume=resume, progress=show_progress(progress), **limit, **options)
    click.echo(json.dumps(result, default=str))


@train.command()
@data_options
@click.option("--folds", type=click.IntRange(min=2), default=2, show_default=True,
              help="Cross-fitted first stages (each trained without one fold of the images).")
@click.option("--candidates", type=click.Choice(["crossfit", "production"]), default="crossfit", show_default=True,
              help="Where candidates and residual scores come from.")
@click.option("--run-name", default="split", show_default=True, help="Sub-folder of --out to train into.")
@settings(SPLIT_OPTIONS)
@library_errors
def split(captions: Path, images: Path, out: Path, cache: Path | None, device: str | None, precision: str,
          resume: bool, progress: bool | None, folds: int, candidates: str, run_name: str,
          settings: tuple[str, ...]) -> None:
    """The split reranker of the default preset: view token caches (in --cache), cross-fitted first stages
    (--out/crossfit), then training (--out/RUN_NAME)."""
    from edje_qdrant.train.split_run import train_split  # cost: torch, transformers

    options = parse_settings(settings, {})
    click.echo(json.dumps(train_split(captions, images, out, options, token_root=cache, folds=folds,
                                      candidates=candidates, device=device, precision=precision, resume=resume,
                                      progress=show_progress(progress), run_name=run_name), default=str))


@train.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Training folder (the first stage in it; the edje reranker in it, the split one in --out/split).")
@click.option("--to", "export_to", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model folder to write (load it with --model FOLDER).")
@click.option("--kind", type=click.Choice(["edje", "split"]), default="edje", show_default=True,
              help="Which trained reranker to export.")
@click.option("--run-name", default="split", show_default=True, help="split: the sub-folder of --out it trained in.")
@click.option("--first-stage", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Training or model folder whose first stage to export (default: edje: --out; split: the "
                   "bundled preset's).")
@library_errors
def export(out: Path, export_to: Path, kind: str, run_name: str, first_stage: Path | None) -> None:
    """Write a model folder from a training folder (fp16, trained weights only)."""
    from edje_qdrant.models.flickr8k_preset import PRESET_DIR  # cost: the models package
    from edje_qdrant.train.export import export_model  # cost: torch, transformers

    run = out / run_name if kind == "split" else out
    source = first_stage or (PRESET_DIR if kind == "split" else out)
    click.echo(json.dumps({"exported": str(export_model(kind, run, export_to, source))}))
