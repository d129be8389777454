"""Options of ``ingest`` beyond one machine: Ray (``--ray``, ``--ray-workers``, ``--gpus-per-worker``) and the
layout of a new collection on a server (``--shards``, ``--replication``, ``--on-disk-*``, ``--quantization``)."""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import click

from edje_qdrant.errors import InputError

_RAY = ("ray_address", "ray_workers", "gpus_per_worker")
_LAYOUT = ("shards", "replication", "on_disk_payload", "on_disk_vectors", "on_disk_index", "quantization")
_OPTIONS = [
    click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                 help="Run decoding and the model on Ray (extra `ray`): alone, a local Ray instance (or "
                      "RAY_ADDRESS); `auto`, HOST:PORT or ray://HOST:10001 joins a cluster."),
    click.option("--ray-workers", type=click.IntRange(min=1), default=None,
                 help="With --ray: Ray workers, each holding the model (default 1)."),
    click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=0.0, show_default=True,
                 help="With --ray: GPUs per Ray worker (a fraction shares one GPU)."),
    click.option("--shards", type=click.IntRange(min=1), default=None,
                 help="New collection on a server (--url): number of shards."),
    click.option("--replication", type=click.IntRange(min=1), default=None,
                 help="New collection on a server: copies of each shard."),
    click.option("--on-disk-payload/--in-ram-payload", default=None,
                 help="New collection on a server: keep payloads (token blobs) on disk (server default: on disk)."),
    click.option("--on-disk-vectors/--in-ram-vectors", default=None,
                 help="New collection on a server: memory-map the `clip` vectors (default: in RAM)."),
    click.option("--on-disk-index/--in-ram-index", default=None,
                 help="New collection on a server: keep the HNSW index on disk (default: in RAM)."),
    click.option("--quantization", type=click.Choice(["int8"]), default=None,
                 help="New collection on a server: an int8 copy of the vectors pinned in RAM (pair with "
                      "--on-disk-vectors)."),
]


def scale_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The options above, passed to the command as one ``scale`` dict."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs["scale"] = {name: kwargs.pop(name) for name in _RAY + _LAYOUT}
        return func(*args, **kwargs)

    for option in reversed(_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def collection_layout(scale: dict[str, Any]) -> Any:
    """The ``CollectionOptions`` of a new server collection, or None when no layout option was given."""
    if all(scale[k] is None for k in _LAYOUT):
        return None
    from edje_qdrant.store.server import CollectionOptions  # cost: qdrant-client takes seconds to import

    return CollectionOptions(**{k: scale[k] for k in _LAYOUT})


def ray_options(scale: dict[str, Any]) -> Any:
    """The ``RayOptions`` of ``--ray``, or None without it (then the Ray-only options are refused). Ray is
    imported here, so a missing extra is reported before any work."""
    if scale["ray_address"] is None:
        for name, flag in (("ray_workers", "--ray-workers"), ("gpus_per_worker", "--gpus-per-worker")):
            if scale[name]:
                raise InputError(f"{flag} applies to Ray workers: add --ray")
        return None
    from edje_qdrant.ingestion.distributed import RayOptions, import_ray  # cost: imported per command, so --help and argument errors stay fast

    import_ray()
    if logging.getLogger().getEffectiveLevel() > logging.INFO:  # without -v: Ray Data's per-dataset notes and its
        logging.getLogger("ray").setLevel(logging.WARNING)       # "progress bars disabled" (ours is on) stay quiet
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    address = None if scale["ray_address"] == "local" else scale["ray_address"]
    return RayOptions(address=address, workers=scale["ray_workers"] or 1, gpus_per_worker=scale["gpus_per_worker"])
