"""TRL GRPOTrainer steps on the same task, for the train-speed goal (runs in .venv-bench only).

argv: MODEL_DIR PROMPTS_JSON PROMPTS_PER_STEP GROUP_SIZE MAX_TOKENS STEPS. Prints one JSON line
with the wall time of each optimiser step.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for mismatch.learner.rewards (imports only `re`)

from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from mismatch.learner.rewards import reward

model_dir, prompts_file, per_step, group, max_tokens, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
rows = json.loads(Path(prompts_file).read_text())
dataset = Dataset.from_list(
    [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
)


def arithmetic_reward(completions, answer, **_):
    return [reward(c[0]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer, strict=True)]


class StepClock(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


clock = StepClock()
with tempfile.TemporaryDirectory() as out:
    config = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=per_step * group,
        num_generations=group,
        max_completion_length=max_tokens,
        max_steps=steps,
        learning_rate=1e-5,
        bf16=True,
        use_cpu=True,
        temperature=1.0,
        beta=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    trainer = GRPOTrainer(
        model=model_dir, reward_funcs=arithmetic_reward, args=config, train_dataset=dataset, callbacks=[clock]
    )
    trainer.train()
print(json.dumps({"step_times": clock.times}))
