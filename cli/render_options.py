"""`search --html out.html --grid out.png`: write results people can look at, next to the normal output."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import click


def render_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --html PATH and --grid PATH (passed to the command as ``html`` and ``grid``)."""
    func = click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Also write a PNG contact sheet of the results (thumbnails and scores).")(func)
    func = click.option("--html", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Also write an HTML page of the results (thumbnails, the three scores, the query).")(func)
    return func


def write_renders(query: str, results: Sequence[Any], html: Path | None, grid: Path | None, *,
                  fusion_weight: float | None = None) -> None:
    """Write the files asked for; says where on stderr so stdout stays `score  path` lines / JSON."""
    from edje_qdrant.render import write_grid, write_html  # cost: Pillow's drawing modules, only with --html/--grid

    if html is not None:
        click.echo(f"wrote {write_html(query, results, html, fusion_weight=fusion_weight)}", err=True)
    if grid is not None:
        click.echo(f"wrote {write_grid(query, results, grid, fusion_weight=fusion_weight)}", err=True)
