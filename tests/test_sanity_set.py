"""The built-in sanity set: the shipped problems, the names of the built-in sets, the defaults where a
reward is needed, and (with vLLM on the embedded model) that its groups carry a reward signal."""

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mismatch.commands.train import tasks_for
from mismatch.config import ARITHMETIC_SET, SANITY_SET, DiagnoseConfig, ScanConfig, TrainConfig
from mismatch.inputs.prepare import prepare_inputs
from mismatch.inputs.prompts import (
    Prompt,
    PromptError,
    arithmetic_prompts,
    encode_prompts,
    read_prompts,
    sanity_prompts,
)
from mismatch.learner.losses import group_advantages
from mismatch.learner.rewards import reward
from mismatch.records import Sampling

DATA = resources.files("mismatch.inputs") / "data"


def shipped_rows() -> list[dict]:
    return [json.loads(line) for line in (DATA / "sanity.jsonl").read_text(encoding="utf-8").splitlines()]


def test_the_shipped_set_holds_enough_problems_with_integer_answers_solved_20_to_80_percent():
    rows = shipped_rows()
    assert len(rows) >= 128  # train's default pool cycles through it; scan's default takes 64
    assert len({row["prompt"] for row in rows}) == len(rows)
    for row in rows:
        assert str(int(row["answer"])) == row["answer"]
        assert 0.2 <= row["solve_rate"] <= 0.8
        assert row["samples"] >= 8
        assert row["solve_rate"] * row["samples"] == pytest.approx(round(row["solve_rate"] * row["samples"]), abs=1e-3)
    provenance = json.loads((DATA / "sanity.provenance.json").read_text(encoding="utf-8"))
    assert provenance["model"] == "builtin:smollm2-135m" and provenance["dtype"] == "bf16"
    assert sum(provenance["kept"].values()) == len(rows)


def test_each_answer_is_the_problems_own():
    """The questions are `What is A op B? …`: the shipped answer is the arithmetic's."""
    for row in shipped_rows():
        a, op, b = row["prompt"].removeprefix("What is ").split("?")[0].split()
        assert int(row["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_sanity_prompts_are_seeded_samples_of_the_shipped_rows():
    rows = shipped_rows()
    everything = sanity_prompts()
    assert sorted(p.messages[0]["content"] for p in everything) == sorted(row["prompt"] for row in rows)
    assert all(p.answer is not None for p in everything)
    first, again, other = sanity_prompts(20, seed=1), sanity_prompts(20, seed=1), sanity_prompts(20, seed=2)
    assert first == again and first != other and len(first) == 20
    assert sanity_prompts(10, seed=1) == first[:10]
    assert len(sanity_prompts(len(rows) + 1)) == len(rows)  # as a prompt file's first N: all it holds


def test_the_built_in_names_resolve_and_a_path_is_a_file(tmp_path):
    assert read_prompts("builtin:sanity", n=5, builtin_n=64, seed=3) == sanity_prompts(5, seed=3)
    assert read_prompts(Path("builtin:sanity"), n=None, builtin_n=7, seed=3) == sanity_prompts(7, seed=3)
    assert read_prompts("builtin:arithmetic", n=None, builtin_n=9, seed=1) == arithmetic_prompts(9, seed=1)
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    assert [p.messages[0]["content"] for p in read_prompts(tmp_path / "p.txt", n=2, builtin_n=64, seed=0)] == [
        "one",
        "two",
    ]
    assert len(read_prompts(tmp_path / "p.txt", n=None, builtin_n=1, seed=0)) == 3
    with pytest.raises(PromptError, match=r"^unknown prompt set 'builtin:gsm8k': use builtin:sanity, builtin:ar"):
        read_prompts("builtin:gsm8k", n=None, builtin_n=8, seed=0)


def test_defaults_train_uses_the_sanity_set_scan_only_where_it_rewards_groups(tmp_path):
    scan = ScanConfig("m", "hf", ["bf16"], tmp_path)
    assert scan.prompt_set() == ARITHMETIC_SET and scan.to_json()["prompts"] == ARITHMETIC_SET
    assert ScanConfig("m", "hf", ["bf16"], tmp_path, samples=2).prompt_set() == SANITY_SET
    assert ScanConfig("m", "hf", ["bf16"], tmp_path, samples=4, prompts=Path("p.jsonl")).prompt_set() == Path("p.jsonl")
    train = TrainConfig("m", "hf", ["bf16"], tmp_path)
    assert train.prompt_set() == SANITY_SET and train.to_json("bf16")["prompts"] == SANITY_SET
    explicit = TrainConfig("m", "hf", ["bf16"], tmp_path, prompts=Path("builtin:arithmetic"))
    assert explicit.prompt_set() == Path(ARITHMETIC_SET) and explicit.to_json("bf16")["prompts"] == ARITHMETIC_SET
    # diagnose as scan; but a scan that recorded no prompt set (before the sanity set) was arithmetic
    assert DiagnoseConfig("m", "vllm", ["bf16"], tmp_path, samples=4).prompt_set() == SANITY_SET
    old = DiagnoseConfig("m", "vllm", ["bf16"], tmp_path, samples=4, from_run=tmp_path)
    assert old.prompt_set() == ARITHMETIC_SET


def test_train_takes_its_prompts_from_the_sanity_set(tmp_path):
    tasks, answers = tasks_for(TrainConfig("m", "hf", ["bf16"], tmp_path, seed=5))
    assert tasks == sanity_prompts(256, seed=5)
    assert answers == [t.answer for t in tasks]


def test_scan_with_one_sample_encodes_the_arithmetic_set_as_before(tiny_model, tmp_path):
    """`make scan`'s numbers stay as they were: the same 64 arithmetic prompts, the same token ids."""
    inputs = prepare_inputs(ScanConfig(str(tiny_model), "hf", ["bf16"], tmp_path, Sampling(max_tokens=8, seed=2)))
    expected = encode_prompts(AutoTokenizer.from_pretrained(tiny_model), arithmetic_prompts(64, seed=2))
    assert inputs.prompt_ids == expected
    grouped = prepare_inputs(ScanConfig(str(tiny_model), "hf", ["bf16"], tmp_path, Sampling(max_tokens=8), samples=2))
    assert len(grouped.prompt_ids) == 64 and grouped.answers == [p.answer for p in sanity_prompts(64)]


PROBLEMS = 8  # per set
GROUP = 8  # train's --group-size


def signal(engine, tokenizer, prompts: list[Prompt]) -> float:
    """The share of GRPO groups (train's sampling and reward) whose advantages are not all zero."""
    rollouts = engine.generate(encode_prompts(tokenizer, prompts), GROUP, Sampling(temperature=1.0, max_tokens=96))
    texts = tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
    answers = [prompts[r.prompt_index].answer for r in rollouts]
    rewards = torch.tensor([reward(text, answer) for text, answer in zip(texts, answers, strict=True)])
    moving = group_advantages(rewards, GROUP).view(-1, GROUP).abs().amax(-1) > 0
    return float(moving.float().mean())


@pytest.mark.engine
@pytest.mark.slow
def test_the_sanity_set_carries_signal_where_arithmetic_does_not():
    """8 problems × 8 samples of each set from the embedded model as train samples them: most sanity
    groups move, most arithmetic groups do not (it solves ~4% of them)."""
    from mismatch.engines import start_engine
    from mismatch.model.loading import load_tokenizer, resolve_model

    model_path = resolve_model("builtin:smollm2-135m")
    tokenizer = load_tokenizer(model_path)
    engine = start_engine("vllm", model_path, "bf16", seed=0)
    try:
        sanity = signal(engine, tokenizer, sanity_prompts(PROBLEMS, seed=0))
        arithmetic = signal(engine, tokenizer, arithmetic_prompts(PROBLEMS, seed=0))
    finally:
        engine.close()
    print(f"groups with a non-zero advantage: sanity {sanity:.3f}, arithmetic {arithmetic:.3f}")
    assert sanity >= 0.625
    assert sanity - arithmetic >= 0.375
