"""Prompts: the built-in sets (with verifiable answers), prompt files, chat templating."""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mismatch.errors import PromptError, first_line, parquet_damage

PROMPT_FORMATS = (".jsonl", ".txt", ".csv", ".parquet")
BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Prompt:
    messages: tuple[dict, ...]  # chat messages; a plain prompt is one user message
    answer: str | None = None

    @classmethod
    def from_text(cls, text: str, answer: str | None = None) -> Prompt:
        return cls(({"role": "user", "content": text},), answer)


def arithmetic_prompts(n: int, seed: int = 0) -> list[Prompt]:
    """`n` seeded arithmetic questions with integer answers: sums, differences, products."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        op = rng.choice("+-*")
        largest = 19 if op == "*" else 99
        a = rng.randint(2, largest)
        b = rng.randint(2, largest)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        text = f"What is {a} {op} {b}? Think step by step, then give the final answer as a single number."
        prompts.append(Prompt.from_text(text, str(answer)))
    return prompts


def sanity_prompts(n: int | None = None, seed: int = 0) -> list[Prompt]:
    """`n` problems of the shipped sanity set (all when None or more than it holds, as a prompt file's), in a
    seeded order: problems the embedded model solves 20–80% of the time, found by sampling it
    (bench/sanity_set.py), so that most GRPO groups of them carry a reward signal."""
    data = resources.files("mismatch.inputs") / "data" / "sanity.jsonl"
    problems = _parse_jsonl(data.read_text(encoding="utf-8"), "the sanity set")
    order = random.Random(seed).sample(range(len(problems)), len(problems))
    return [problems[i] for i in order[:n]]


BUILTIN_SETS: dict[str, Callable[[int, int], list[Prompt]]] = {
    "sanity": sanity_prompts,
    "arithmetic": arithmetic_prompts,
}


def read_prompts(spec: str | Path, *, n: int | None, builtin_n: int, seed: int) -> list[Prompt]:
    """The prompts `spec` names: a built-in set (`builtin:sanity`, `builtin:arithmetic`: `n` of it, else
    `builtin_n`) or a prompt file (its first `n`, else all of it)."""
    text = str(spec)
    if not text.startswith(BUILTIN_PREFIX):
        return load_prompts(Path(spec))[:n]
    name = text.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_SETS:
        raise PromptError(
            f"unknown prompt set {text!r}: use {', '.join(BUILTIN_PREFIX + known for known in BUILTIN_SETS)} or a file"
        )
    return BUILTIN_SETS[name](builtin_n if n is None else n, seed)


def load_prompts(path: Path) -> list[Prompt]:
    """Read `.jsonl` (`prompt` or `messages`, optional `answer`), `.txt`, `.csv` or `.parquet` (`prompt`)."""
    if not path.is_file():
        raise PromptError(f"prompt file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = _read_jsonl(path)
    elif suffix == ".txt":
        prompts = [Prompt.from_text(line) for line in _read_text(path).splitlines() if line.strip()]
    elif suffix == ".csv":
        prompts = _from_rows(_read_csv(path), path)
    elif suffix == ".parquet":
        prompts = _from_rows(_read_parquet(path), path)
    else:
        raise PromptError(f"unsupported prompt file {path.name}: use one of {', '.join(PROMPT_FORMATS)}")
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts")
    return prompts


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path} is not UTF-8 text (byte {exc.start}): re-encode it as UTF-8") from None
    except OSError as exc:
        raise PromptError(f"prompt file {path} cannot be read ({first_line(exc)})") from None


def _read_csv(path: Path) -> list[dict]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path} is not UTF-8 text (byte {exc.start}): re-encode it as UTF-8") from None
    except (csv.Error, OSError) as exc:  # a NUL byte, a field over the csv module's limit
        raise PromptError(f"{path} is not a CSV file this reads ({first_line(exc)})") from None


def _read_parquet(path: Path) -> list[dict]:
    import pandas as pd

    with parquet_damage(path, PromptError, "the file is truncated or damaged"):
        return pd.read_parquet(path).to_dict("records")


def _read_jsonl(path: Path) -> list[Prompt]:
    return _parse_jsonl(_read_text(path), str(path))


def _parse_jsonl(text: str, source: str) -> list[Prompt]:
    """`source`: where the text comes from, as an error names it."""
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{source}:{number}: malformed JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number, nesting past the stack
            raise PromptError(f"{source}:{number}: malformed JSON ({first_line(exc)})") from None
        if not isinstance(row, dict):
            raise PromptError(f"{source}:{number}: each line needs a JSON object with 'prompt' or 'messages'")
        answer = None if row.get("answer") is None else str(row["answer"])
        if isinstance(row.get("messages"), list) and row["messages"]:
            if not all(_is_message(m) for m in row["messages"]):
                raise PromptError(f"{source}:{number}: each message needs a string 'role' and a string 'content'")
            prompts.append(Prompt(tuple(row["messages"]), answer))
        elif isinstance(row.get("prompt"), str):
            prompts.append(Prompt.from_text(row["prompt"], answer))
        else:
            raise PromptError(f"{source}:{number}: each line needs a string 'prompt' or a list 'messages'")
    return prompts


def _is_message(message: object) -> bool:
    return (
        isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)
    )


def _from_rows(rows: list[dict], path: Path) -> list[Prompt]:
    if rows and "prompt" not in rows[0]:
        raise PromptError(f"{path} has no 'prompt' column (columns: {', '.join(map(str, rows[0]))})")
    return [
        Prompt.from_text(_cell(row["prompt"]), _cell(row.get("answer")) or None)
        for row in rows
        if _cell(row["prompt"]).strip()
    ]


def _cell(value: object) -> str:
    """A table cell as text; an empty cell (None, NaN: a short CSV row, a null in parquet) as ""."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def encode_prompts(tokenizer, prompts: list[Prompt], chat_template: bool = True) -> list[list[int]]:
    """Token ids for each prompt: the chat template (with generation prompt) when there is one."""
    use_template = chat_template and tokenizer.chat_template is not None
    encoded = []
    for prompt in prompts:
        if use_template:
            text = tokenizer.apply_chat_template(list(prompt.messages), add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = tokenizer("\n".join(m["content"] for m in prompt.messages)).input_ids
        if not ids:
            raise PromptError("a prompt encodes to no tokens; remove empty prompts")
        encoded.append(ids)
    return encoded
