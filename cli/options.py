"""Options shared by the commands: where the store is and which model to use."""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from edje_qdrant.errors import EdjeError

DEFAULT_STORE = "./edje-data"
DEFAULT_COLLECTION = "images"


def store_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--store/--url/--api-key/--collection (env vars shown in --help)."""
    options = [
        click.option("--store", envvar="EDJE_STORE", show_envvar=True, default=DEFAULT_STORE, show_default=True,
                     type=click.Path(file_okay=False), help="Embedded Qdrant Edge store folder."),
        click.option("--url", envvar="QDRANT_URL", show_envvar=True, default=None,
                     help="Qdrant server URL (uses the server instead of the embedded store)."),
        click.option("--api-key", envvar="QDRANT_API_KEY", show_envvar=True, default=None,
                     help="Qdrant server API key (never printed)."),
        click.option("--collection", envvar="EDJE_COLLECTION", show_envvar=True, default=DEFAULT_COLLECTION,
                     show_default=True, help="Collection name."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def model_options(default_model: str | None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--model/--device; ``default_model`` None means: the model recorded in the collection."""

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        help_model = "Preset name or local model directory." + (
            "" if default_model else " Default: the model the collection was built with."
        )
        func = click.option("--device", envvar="EDJE_DEVICE", show_envvar=True, default=None,
                            help="torch device (default: cuda if available, else cpu).")(func)
        func = click.option("--model", envvar="EDJE_MODEL", show_envvar=True, default=default_model,
                            show_default=bool(default_model), help=help_model)(func)
        return func

    return wrap


def progress_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """--progress/--no-progress (passed as ``progress``: True, False or None for "decide by the terminal")."""
    return click.option("--progress/--no-progress", "progress", default=None,
                        help="Progress bars on stderr (default: only when stderr is a terminal and without "
                             "--json; piped or redirected output stays free of them).")(func)


def show_progress(progress: bool | None, as_json: bool = False) -> bool:
    """Whether to draw progress bars: as --progress/--no-progress says, else only on a terminal, never with --json."""
    if progress is not None:
        return progress
    return not as_json and sys.stderr.isatty()


def open_store_from(store: str, url: str | None, api_key: str | None, *, create: bool = True,
                    collection_options: Any = None) -> Any:
    """The store the options name; ``create=False`` for read-only commands (a missing store is an error)."""
    from edje_qdrant.store import open_store  # cost: the store libraries, once the arguments are checked

    return open_store(path=None if url else store, url=url, api_key=api_key, create=create,
                      collection_options=collection_options)


def library_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn EdjeError into a one-line `Error: ...` and exit code 1 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EdjeError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper
