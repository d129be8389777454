"""Counterfactual image views for reranker training and the caption each view needs.

- ``orig``: the photo as it is.
- ``flip``: mirrored left to right; ``left`` and ``right`` swap in the caption.
- ``recolour``: the colour channels rotated (red things turn green, green blue, blue red; black, white and gray
  stay); the colour features are computed from the rotated pixels while the DINOv2 tokens stay those of the
  original (DINOv2 is trained to ignore colour). Captions get red -> green -> blue -> red. A caption naming a
  colour the rotation has no word for (yellow turns cyan, brown dark green, ...) cannot follow: images with such a
  caption are not shown in this view, and such a caption used as a negative keeps its words, which stay false.
"""
from __future__ import annotations

import re

from PIL import Image

VIEWS = ("orig", "flip", "recolour")
_SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_ROTATED = {"red": "green", "green": "blue", "blue": "red"}
_ROTATABLE = re.compile(r"\b(red|green|blue)\b", re.IGNORECASE)
# colour words whose rotated colour has no word: a caption holding one cannot describe the recoloured photo
_NO_WORD = re.compile(r"\b(yellow|orange|pink|purple|brown|tan|golden|gold|blond|blonde|beige|maroon|violet|"
                      r"turquoise|teal|khaki|navy|redhead|redheaded|brunette|colorful|colourful|multicolored|"
                      r"rainbow|camouflage|camo)\b", re.IGNORECASE)


def _keep_case(old: str, new: str) -> str:
    return new.capitalize() if old[0].isupper() else new


def mirror_caption(text: str) -> str:
    """The caption of the mirrored image: ``left`` and ``right`` swapped (case kept)."""
    return _SIDES.sub(lambda m: _keep_case(m.group(1), "right" if m.group(1).lower() == "left" else "left"), text)


def recolour_caption(text: str) -> str:
    """The caption of the recoloured image as far as words go: red -> green -> blue -> red (case kept)."""
    return _ROTATABLE.sub(lambda m: _keep_case(m.group(1), _ROTATED[m.group(1).lower()]), text)


def recolourable(text: str) -> bool:
    """Whether ``recolour_caption(text)`` describes the recoloured photo (no colour word without a rotated word)."""
    return _NO_WORD.search(text) is None


def view_caption(text: str, view: str) -> str:
    """The caption that goes with ``view`` of its photo."""
    if view == "flip":
        return mirror_caption(text)
    if view == "recolour":
        return recolour_caption(text)
    return text


def view_image(image: Image.Image, view: str) -> Image.Image:
    """``view`` of an RGB photo: mirrored, colour channels rotated (new R, G, B = old B, R, G), or as it is."""
    if view == "flip":
        return image.transpose(Image.FLIP_LEFT_RIGHT)
    if view == "recolour":
        r, g, b = image.split()
        return Image.merge("RGB", (b, r, g))
    return image
