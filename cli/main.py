"""The `edje-qdrant` command line: ingest a folder, search it, inspect the collection."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from .options import library_errors, model_options, open_store_from, store_options

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
    from edje_qdrant.ingest import ingest as run_ingest
    from edje_qdrant.models import load_model

    edje_model = load_model(model, device=device)
    target = open_store_from(store, url, api_key)
    if errors_file is None and not url:
        errors_file = Path(store) / "ingest-errors.jsonl"
    try:
        report = run_ingest(folder, target, edje_model, collection, dtype=dtype, batch_size=batch_size,
                            workers=workers, errors_file=errors_file, progress=not as_json)
    except KeyboardInterrupt:
        click.echo("interrupted: everything ingested so far is stored; run the same command again to resume",
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
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results.")
@library_errors
def search(query: str, store: str, url: str | None, api_key: str | None, collection: str, model: str | None,
           device: str | None, k: int, rerank_k: int, as_json: bool) -> None:
    """Search the collection for QUERY; prints `score  path` lines (best first)."""
    from edje_qdrant.retriever import Retriever, check_search_args

    check_search_args(query, k, rerank_k)
    target = open_store_from(store, url, api_key)
    try:
        results = Retriever(target, collection, model, device=device).search(query, k=k, rerank_k=rerank_k)
    finally:
        target.close()
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


if __name__ == "__main__":  # pragma: no cover
    main()
