"""``pip install mergenet-fl`` into another app gives the library, the strategies and the client
helpers, with their own dependencies only: nothing of this project's studies."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_is_the_library_and_the_strategies(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".venv", "outputs", ".git", "*.egg-info", "__pycache__"),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("mergenet_fl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"mergenet_fl"}  # nothing generic (e.g. "strategies") at the top level
    assert "mergenet_fl/flower/legacy.py" in names and "mergenet_fl/flower/runlog.py" in names
    requires = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)", metadata.decode(), re.M)
    assert sorted(r.lower() for r in requires) == ["flwr", "matplotlib", "numpy", "torch"]


def test_the_library_imports_without_flower():
    """The core stays torch and numpy only: the Flower side is the ``mergenet_fl.flower``
    subpackage, imported by whoever uses it."""
    code = "import sys, mergenet_fl; print(sorted(m for m in sys.modules if 'flwr' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
