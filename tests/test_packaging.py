"""The distribution as a user gets it: `python -m build` makes an sdist and, from that sdist, a wheel
(so a build from the sdist alone works); both pass `twine check`; the wheel installed with --no-deps into
a fresh virtual environment runs `mismatch --version` and `mismatch --help` and carries every file of the
package (the templates and the prompt data among them).

The fresh environment gets its dependencies without a download: `python -m venv --system-site-packages`
exposes the base interpreter's site-packages only (not this virtual environment's, where torch is), so a
.pth file in it appends this environment's site-packages to its path. A .pth line adds a folder without
running that folder's own .pth files, so the checkout's editable install stays out, and the new
environment's own site-packages comes first: `mismatch` is imported from the wheel."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from mismatch import DISTRIBUTION
from mismatch.runs import versions

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SOURCES = ("pyproject.toml", "README.md", "mismatch")  # what a build reads
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def test_the_distribution_is_named_as_the_code_names_it():
    """`mismatch --version` and summary.json's versions read the metadata under this name."""
    assert PROJECT["name"] == DISTRIBUTION and PROJECT["scripts"] == {"mismatch": "mismatch.cli:app"}
    assert versions()["mismatch"] == PROJECT["version"]


def run(*command: str | Path, cwd: Path) -> str:
    """The command's output; a failure shows it."""
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result.stdout


def package_files(package: Path) -> set[str]:
    return {path.relative_to(package).as_posix() for path in package.rglob("*") if path.is_file()} - {
        path.relative_to(package).as_posix() for path in package.rglob("__pycache__/*")
    }


@pytest.mark.slow
def test_the_wheel_installs_in_a_fresh_environment_and_runs(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes its egg-info beside the sources
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=IGNORED)
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source, cwd=tmp_path)
    stem = f"{DISTRIBUTION.replace('-', '_')}-{PROJECT['version']}"
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    assert sdist.name == f"{stem}.tar.gz" and wheel.name == f"{stem}-py3-none-any.whl"
    checked = run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, cwd=tmp_path)
    assert checked.count("PASSED") == 2

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip())
    (purelib / "dependencies.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    # pip itself comes from this environment too; --ignore-installed: the editable install's metadata is visible
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=tmp_path)

    version = run(venv / "bin" / "mismatch", "--version", cwd=tmp_path)
    assert version == f"{DISTRIBUTION} {PROJECT['version']}\n"
    assert "scan" in run(venv / "bin" / "mismatch", "--help", cwd=tmp_path)
    found = run(python, "-c", "import mismatch, torch; print(mismatch.__file__)", cwd=tmp_path).strip()
    installed = Path(found).parent
    assert installed == purelib / "mismatch"  # the wheel's, not the checkout's
    shipped = package_files(installed)
    assert {"report/templates/report.html.j2", "inputs/data/sanity.jsonl"} <= shipped
    assert package_files(ROOT / "mismatch") <= shipped, "files of the package missing from the wheel"
