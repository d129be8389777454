"""The `edje-qdrant` command line: ingest a folder, search it, inspect the collection."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .options import library_errors, model_options, open_store_from, parse_where, store_options
from .render_options import render_options, write_renders
from .serve import serve

DEFAULT_MODEL = "tiny-random"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="edje-qdrant")
def main(verbose: int) -> None:
    """EDJE re-ranking for image search on Qdrant."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@store_options
@model_options(DEFAULT_MODEL)
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default="fp16", show_default=True,
              help="Storage precision of the compressed image tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per model forward.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Image decoding workers.")
@click.option("--errors-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON lines of skipped files and reasons (default: <store>/ingest-errors.jsonl).")
@click.option("--json", "as_json", is_flag=True, help="End with one JSON summary object.")
@library_errors
def ingest(folder: Path, store: str, url: str | None, api_key: str | None, collection: str, model: str,
           device: str | None, dtype: str, batch_size: int | None, workers: int | None,
           errors_file: Path | None, as_json: bool) -> None:
    """Ingest every image under FOLDER (recursive, resumable, idempotent)."""
    try:  # Ctrl-C while the model loads: a clean exit too, nothing was written yet
        from edje_qdrant.ingest import ingest as run_ingest
        from edje_qdrant.models import load_model

        edje_model = load_model(model, device=device)
        target = open_store_from(store, url, api_key)
    except KeyboardInterrupt:
        click.echo("interrupted before ingesting anything", err=True)
        sys.exit(130)
    if errors_file is None and not url:
        errors_file = Path(store) / "ingest-errors.jsonl"
    try:
        report = run_ingest(folder, target, edje_model, collection, dtype=dtype, batch_size=batch_size,
                            workers=workers, errors_file=errors_file, progress=not as_json)
    except KeyboardInterrupt as exc:
        partial = getattr(exc, "ingest_report", None)
        done = (f" (ingested {partial.ingested}, skipped-existing {partial.skipped_existing}, failed {partial.failed})"
                if partial is not None else "")
        click.echo(f"interrupted{done}: everything ingested so far is stored; run the same command again to resume",
                   err=True)
        sys.exit(130)
    finally:
        target.close()
    summary = report.to_dict()
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(
            f"ingested {report.ingested}, skipped-existing {report.skipped_existing}, failed {report.failed}, "
            f"{report.images_per_s:.1f} images/s"
            + (f" (reasons in {report.errors_file})" if report.failed and report.errors_file else "")
        )


@main.command()
@click.argument("query")
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
def search(query: str, store: str, url: str | None, api_key: str | None, collection: str, model: str | None,
           device: str | None, k: int, rerank_k: int, where: tuple[str, ...], as_json: bool,
           html: Path | None, grid: Path | None) -> None:
    """Search the collection for QUERY; prints `score  path` lines (best first)."""
    from edje_qdrant.retriever import Retriever, check_search_args

    check_search_args(query, k, rerank_k)
    filter = parse_where(where)
    target = open_store_from(store, url, api_key)
    try:
        results = Retriever(target, collection, model, device=device).search(
            query, k=k, rerank_k=rerank_k, filter=filter
        )
    finally:
        target.close()
    if html or grid:
        write_renders(query, results, html, grid)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results]))
        return
    for r in results:
        click.echo(f"{r.score:.4f}  {r.path}")


@main.command()
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@library_errors
def info(store: str, url: str | None, api_key: str | None, collection: str, as_json: bool) -> None:
    """Show the collection: points, model, codec, disk use."""
    from edje_qdrant.errors import StoreError

    target = open_store_from(store, url, api_key)
    try:
        spec = target.get_spec(collection)
        if spec is None:
            raise StoreError(f"collection '{collection}' does not exist; run `edje-qdrant ingest DIR` first")
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
    finally:
        target.close()
    if as_json:
        click.echo(json.dumps(data))
        return
    for key, value in data.items():
        click.echo(f"{key:12s} {value}")


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
    from edje_qdrant.models.official import convert_official

    from edje_qdrant.errors import InputError

    config = None
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--config {config_file}: not readable JSON ({exc})") from None
    path = convert_official(source, out_dir, fp16=fp16, preset=preset, config=config)
    click.echo(f"wrote {path}")


main.add_command(serve)


if __name__ == "__main__":  # pragma: no cover
    main()
