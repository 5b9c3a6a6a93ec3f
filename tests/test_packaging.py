"""The recipes ship inside the wheel: `dcdit flops --recipe b-n4` works from any directory."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_recipes_and_finds_them(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                            "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dcdit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).stem for n in names if n.startswith("dcdit_cli/recipes/") and n.endswith(".toml")}
    assert shipped == {p.stem for p in (ROOT / "recipes").rglob("*.toml")}
    modules = {str(p.relative_to(ROOT)) for p in (ROOT / "dcdit_cli").rglob("*.py")}
    assert modules <= set(names), f"pyproject's packages list misses {sorted(modules - set(names))[:3]}"
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "dcdit_cli", "flops", "--recipe", "b-n4", "--json"], cwd=elsewhere,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"recipe": "b-n4"' in proc.stdout
    where = subprocess.run([sys.executable, "-c", "from dcdit_cli.config.recipe import recipes_dir; print(recipes_dir())"],
                           cwd=elsewhere, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert where.stdout.strip() == str(tmp_path / "site" / "dcdit_cli" / "recipes")
