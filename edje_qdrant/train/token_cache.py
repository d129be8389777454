"""Vision-token cache: DINOv2 last hidden states (CLS + 256 patches, fp16) of every image, computed once.

Layout of a cache folder: ``tokens.f16`` (memory-mapped float16 [N, 257, 384]), ``images.txt`` (one file name a
line, row order) and ``progress.txt`` (rows done, so an interrupted run resumes where it stopped).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edje_qdrant.errors import InputError
from edje_qdrant.models import dinov2
from edje_qdrant.train.views import view_image

log = logging.getLogger(__name__)
ROWS = 1 + dinov2.NUM_PATCHES


def load_pixels(images_dir: Path, names: list[str], view: str = "orig") -> torch.Tensor:
    """Preprocessed pixels [B, 3, 224, 224] of ``names`` in ``images_dir``, in one of ``views.VIEWS``."""
    pixels = []
    for name in names:
        path = images_dir / name
        if not path.is_file():
            raise InputError(f"image {path} (listed in the captions file) does not exist")
        with Image.open(path) as im:
            pixels.append(dinov2.preprocess_image(view_image(im.convert("RGB"), view)))
    return torch.from_numpy(np.stack(pixels))


class TokenCache:
    """Read side of a token cache: ``rows(names)`` -> float16 tensor [B, 257, 384]."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        names_file = self.folder / "images.txt"
        if not names_file.is_file():
            raise InputError(f"token cache {self.folder} has no images.txt; build it with build_token_cache")
        self.images = names_file.read_text().split("\n")
        self.images = [n for n in self.images if n]
        done = int((self.folder / "progress.txt").read_text().strip() or 0)
        if done < len(self.images):
            raise InputError(f"token cache {self.folder} is incomplete ({done}/{len(self.images)} rows); "
                             "rerun build_token_cache to finish it")
        self.index = {n: i for i, n in enumerate(self.images)}
        self.tokens = np.memmap(self.folder / "tokens.f16", dtype=np.float16, mode="r",
                                shape=(len(self.images), ROWS, dinov2.WIDTH))

    def rows(self, names: list[str]) -> torch.Tensor:
        """Cached hidden states of the named images, float16 [B, 257, 384]."""
        try:
            idx = [self.index[n] for n in names]
        except KeyError as exc:
            raise InputError(f"image {exc.args[0]} is not in token cache {self.folder}; rebuild the cache") from None
        return torch.from_numpy(np.ascontiguousarray(self.tokens[idx]))

    def global_features(self, names: list[str], chunk: int = 512) -> torch.Tensor:
        """concat(CLS, mean patch) float32 [B, 768] of the named images."""
        out = []
        for i in range(0, len(names), chunk):
            out.append(dinov2.global_feature(self.rows(names[i:i + chunk]).float()))
        return torch.cat(out)


def build_token_cache(images_dir: str | Path, names: list[str], out: str | Path, batch_size: int = 32,
                      device: str = "cpu", bf16: bool = True, progress: bool = True) -> TokenCache:
    """Run the frozen DINOv2 once over ``names`` (files in ``images_dir``); resumes an interrupted build."""
    images_dir, out = Path(images_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names_file, progress_file = out / "images.txt", out / "progress.txt"
    if names_file.is_file() and names_file.read_text().split("\n")[: len(names)] != names:
        raise InputError(f"token cache {out} was built for another image list; use an empty folder")
    names_file.write_text("\n".join(names) + "\n")
    done = int(progress_file.read_text().strip()) if progress_file.is_file() else 0
    mode = "r+" if (out / "tokens.f16").is_file() else "w+"
    mm = np.memmap(out / "tokens.f16", dtype=np.float16, mode=mode, shape=(len(names), ROWS, dinov2.WIDTH))
    if done < len(names):
        backbone = dinov2.load_backbone(device)
        bar = None
        if progress:
            from tqdm import tqdm  # cost: only runs that draw a bar load it
            bar = tqdm(total=len(names), initial=done, desc="DINOv2 tokens", unit="img")
        for start in range(done, len(names), batch_size):
            chunk = names[start:start + batch_size]
            x = load_pixels(images_dir, chunk).to(device)
            with torch.no_grad(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                                 enabled=bf16):
                hidden = backbone(pixel_values=x).last_hidden_state
            mm[start:start + len(chunk)] = hidden.float().cpu().numpy().astype(np.float16)
            mm.flush()
            tmp = progress_file.with_suffix(".tmp")
            tmp.write_text(str(start + len(chunk)))
            os.replace(tmp, progress_file)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    del mm
    return TokenCache(out)


def view_folder(root: str | Path, view: str, layer: int) -> Path:
    """Folder of one (view, layer) token cache under ``root``: ``orig-L12``, ``flip-L9``, ..."""
    return Path(root) / f"{view}-L{layer}"


def build_view_caches(images_dir: str | Path, names: list[str], root: str | Path, layers: tuple[int, ...] = (12,),
                      views: tuple[str, ...] = ("orig", "flip"), batch_size: int = 32, device: str = "cpu",
                      bf16: bool = True, progress: bool = True) -> dict[tuple[str, int], TokenCache]:
    """One DINOv2 pass per view fills a TokenCache per (view, layer); intermediate layers go through the final
    LayerNorm like the last one. Views: ``orig`` and ``flip`` (horizontal mirror). Resumable per view."""
    images_dir, root = Path(images_dir), Path(root)
    unknown = [v for v in views if v not in ("orig", "flip")]
    if unknown or not layers or any(not 1 <= k <= 12 for k in layers):
        raise InputError(f"views must be orig/flip and layers 1..12, got views={views} layers={layers}")
    backbone = None
    out: dict[tuple[str, int], TokenCache] = {}
    for view in views:
        folders = [view_folder(root, view, k) for k in layers]
        dones = []
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            names_file = folder / "images.txt"
            if names_file.is_file() and names_file.read_text().split("\n")[: len(names)] != names:
                raise InputError(f"token cache {folder} was built for another image list; use an empty folder")
            names_file.write_text("\n".join(names) + "\n")
            pf = folder / "progress.txt"
            dones.append(int(pf.read_text().strip()) if pf.is_file() else 0)
        done = min(dones)
        maps = [np.memmap(f / "tokens.f16", dtype=np.float16, mode="r+" if (f / "tokens.f16").is_file() else "w+",
                          shape=(len(names), ROWS, dinov2.WIDTH)) for f in folders]
        if done < len(names):
            backbone = backbone or dinov2.load_backbone(device)
            bar = None
            if progress:
                from tqdm import tqdm  # cost: only runs that draw a bar load it
                bar = tqdm(total=len(names), initial=done, desc=f"DINOv2 tokens ({view})", unit="img")
            for start in range(done, len(names), batch_size):
                chunk = names[start:start + batch_size]
                x = load_pixels(images_dir, chunk, view).to(device)
                with torch.no_grad(), torch.autocast(device_type=torch.device(device).type,
                                                     dtype=torch.bfloat16, enabled=bf16):
                    hs = backbone(pixel_values=x, output_hidden_states=True).hidden_states
                    for mm, k in zip(maps, layers):
                        h = backbone.layernorm(hs[k]) if k < 12 else backbone.layernorm(hs[12])
                        mm[start:start + len(chunk)] = h.float().cpu().numpy().astype(np.float16)
                for mm, folder in zip(maps, folders):
                    mm.flush()
                    tmp = folder / "progress.tmp"
                    tmp.write_text(str(start + len(chunk)))
                    os.replace(tmp, folder / "progress.txt")
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        del maps
        for folder, k in zip(folders, layers):
            out[(view, k)] = TokenCache(folder)
    return out


def colour_cache(images_dir: str | Path, names: list[str], root: str | Path, view: str,
                 batch_size: int = 64) -> np.ndarray:
    """Colour features per patch (models/colour.py) of ``names`` in one view, float16 [N, 256, 14], computed from
    the same preprocessed pixels as the DINOv2 tokens and memoised as ``root/colour-{view}.npy``."""
    root = Path(root)
    path, names_file = root / f"colour-{view}.npy", root / f"colour-{view}.txt"
    if path.is_file() and names_file.is_file() and names_file.read_text().split("\n")[: len(names)] == names:
        return np.load(path, mmap_mode="r")
    out = []
    for start in range(0, len(names), batch_size):
        pixels = load_pixels(Path(images_dir), names[start:start + batch_size], view)
        out.append(dinov2.colour_features(pixels).numpy().astype(np.float16))
    feats = np.concatenate(out)
    root.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    names_file.write_text("\n".join(names) + "\n")
    return feats
