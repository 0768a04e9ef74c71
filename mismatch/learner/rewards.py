"""Verifiable reward for the arithmetic task: 1 when the response's final number is the answer."""

from __future__ import annotations

import re
from collections.abc import Callable

_BOXED = re.compile(r"\\boxed\{\s*(-?[\d,]*\.?\d+)\s*\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The answer a response commits to: the last `\\boxed{…}` number, else the last number in it."""
    found = _BOXED.findall(text) or _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def reward(response: str, answer: str) -> float:
    value = final_number(response)
    return float(value is not None and value == float(answer))


def rollout_rewards(
    texts: list[str], answers: list[str], prompt_indices: list[int], *, reward_fn: Callable[[str, str], float] = reward
) -> list[float]:
    """The reward of each decoded response against its prompt's answer."""
    return [reward_fn(text, answers[p]) for text, p in zip(texts, prompt_indices, strict=True)]
