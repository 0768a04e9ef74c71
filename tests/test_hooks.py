"""The TRL hook inside a real GRPOTrainer run (CPU, no vLLM) and the verl hook on a verl-shaped batch."""

import os
from types import SimpleNamespace

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import Qwen2ForCausalLM
from trl import GRPOConfig

from mismatch.dumps.open_format import read
from mismatch.errors import DumpError
from mismatch.hooks.trl import MismatchGRPOTrainer
from mismatch.hooks.verl import dump_verl_batch

TEMPERATURE = 0.7  # ≠ 1, so μ (processed scores) and π (logits / T) both have to apply it


def reward_len(completions, **kwargs):
    return [len(c) / 10 for c in completions]


class RecordingTrainer(MismatchGRPOTrainer):
    """Also notes each training micro-batch's optimizer step and completion-mask token count."""

    def _compute_loss(self, model, inputs):
        if self.model.training:
            self.seen.append((self.state.global_step + 1, int(inputs["completion_mask"].sum())))
        return super()._compute_loss(model, inputs)


def run_grpo(tiny_model, tmp_path, **config) -> RecordingTrainer:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        seed=0,
        temperature=TEMPERATURE,
    )
    dataset = Dataset.from_dict({"prompt": [f"What is {i} + {i + 3}?" for i in range(16)]})
    trainer = RecordingTrainer(
        model=str(tiny_model), reward_funcs=reward_len, args=GRPOConfig(**(defaults | config)), train_dataset=dataset
    )
    trainer.seen = []
    trainer.train()
    return trainer


@pytest.mark.slow
def test_trl_hook_dumps_mu_and_pi_per_step(tiny_model, tmp_path):
    # 2 micro-batches per step from one shuffled generation batch of 2 groups: groups must survive the shuffle
    trainer = run_grpo(tiny_model, tmp_path, gradient_accumulation_steps=2)
    dump = tmp_path / "out" / "mismatch"
    assert sorted(p.name for p in dump.iterdir()) == ["step_000001.rank0.parquet", "step_000002.rank0.parquet"]

    chunks = list(read([dump]))
    assert [int(c.tokens["step"].unique()[0]) for c in chunks] == [1, 2]
    for chunk in chunks:
        tokens, step = chunk.tokens, int(chunk.tokens["step"].iat[0])
        assert len(tokens) == sum(n for s, n in trainer.seen if s == step)
        assert (tokens["temperature"] == TEMPERATURE).all()
        sequences = tokens.groupby("prompt_index")["seq_id"].nunique()
        assert len(sequences) == 2 and (sequences == 4).all()
        assert set(chunk.contexts) == set(tokens["seq_id"])
        for seq, rows in tokens.groupby("seq_id"):
            assert chunk.contexts[seq][1] == rows.sort_values("position")["token_id"].tolist()
        prompts = {tuple(chunk.contexts[s][0]) for s in tokens["seq_id"].unique()}
        assert len(prompts) == 2  # one prompt per group
        assert (tokens["logp_trainer"] - tokens["logp_engine"]).abs().max() < 1e-4  # fp32 CPU: same numbers

    # μ of a step-1 sequence (sampled with the initial weights) from an independent forward pass
    seq = int(chunks[0].tokens["seq_id"].iat[0])
    prompt, response = chunks[0].contexts[seq]
    model = Qwen2ForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    logp = torch.log_softmax(logits / TEMPERATURE, dim=-1)
    expected = logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
    rows = chunks[0].tokens.query("seq_id == @seq").sort_values("position")
    np.testing.assert_allclose(rows["logp_engine"], expected.numpy(), atol=2e-5, rtol=0)  # KV-cache decode: ~4e-6
    # the trainer's entropy at each position, as TRL's loss forward computed it: that of π's tempered distribution
    np.testing.assert_allclose(rows["entropy"], -(logp.exp() * logp).sum(-1).numpy(), atol=1e-5, rtol=0)
    assert all(chunk.tokens["entropy"].notna().all() for chunk in chunks)  # every micro-batch under its sampler


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, steps",
    [
        (
            dict(steps_per_generation=2),
            [1, 2],
        ),  # one generation feeds 2 optimizer steps: π at step 2 = old_per_token_logps
        (dict(num_iterations=2, max_steps=4), [1, 3]),  # each generation is trained on twice: written once
    ],
)
def test_trl_hook_under_policy_lag(tiny_model, tmp_path, config, steps):
    run_grpo(tiny_model, tmp_path, **config)
    chunks = list(read([tmp_path / "out" / "mismatch"]))
    assert [int(c.tokens["step"].iat[0]) for c in chunks] == steps
    tokens = [c.tokens for c in chunks]
    # the loss forward after an optimizer step (lr 1e-2) would be far from μ; π at sampling time is not
    assert max((t["logp_trainer"] - t["logp_engine"]).abs().max() for t in tokens) < 1e-4
    groups = np.concatenate([t.drop_duplicates("seq_id")["prompt_index"].to_numpy() for t in tokens])
    assert (np.unique(groups, return_counts=True)[1] == 4).all()  # every group whole, no sequence twice


def verl_batch():
    """Two prompts × two samples in verl's layout: left-padded prompts, right-padded responses, rows
    reordered as balance_batch does, one tool token (response_mask 0) inside a response."""
    pad = 0
    prompts = torch.tensor([[pad, 5, 6], [7, 8, 9], [pad, 5, 6], [7, 8, 9]])
    responses = torch.tensor([[11, 12, 13, pad], [21, 22, pad, pad], [31, 32, 33, 34], [41, pad, pad, pad]])
    response_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 1], [1, 0, 0, 0]])
    attention_mask = torch.cat([(prompts != pad).long(), (responses != pad).long()], dim=1)
    generator = torch.Generator().manual_seed(0)
    rollout = -torch.rand(4, 4, generator=generator) * response_mask
    old = rollout + 1e-3 * torch.randn(4, 4, generator=generator) * response_mask
    tensors = {
        "prompts": prompts,
        "responses": responses,
        "response_mask": response_mask,
        "attention_mask": attention_mask,
        "rollout_log_probs": rollout,
        "old_log_probs": old,
    }
    uid = np.array(["b", "a", "b", "a"], dtype=object)
    return SimpleNamespace(batch=tensors, non_tensor_batch={"uid": uid}, meta_info={"temperature": 0.9})


def test_verl_hook_round_trips_through_the_reader(tmp_path):
    batch = verl_batch()
    entropys = torch.rand(4, 4, generator=torch.Generator().manual_seed(1)) * 3
    path = dump_verl_batch(batch, step=7, out_dir=tmp_path, entropys=entropys)
    assert path == tmp_path / "step_000007.rank0.parquet"
    [chunk] = read([tmp_path])
    tokens = chunk.tokens.sort_values(["seq_id", "position"])
    mask = batch.batch["response_mask"].bool()
    assert tokens["seq_id"].tolist() == [s for s in range(4) for _ in range(int(mask[s].sum()))]
    assert tokens["token_id"].tolist() == batch.batch["responses"][mask].tolist()
    assert tokens["logp_engine"].tolist() == batch.batch["rollout_log_probs"][mask].double().tolist()
    assert tokens["logp_trainer"].tolist() == batch.batch["old_log_probs"][mask].double().tolist()
    assert tokens["entropy"].tolist() == entropys[mask].double().tolist()
    assert tokens.drop_duplicates("seq_id")["prompt_index"].tolist() == [0, 1, 0, 1]
    assert (tokens["step"] == 7).all() and (tokens["temperature"] == 0.9).all()
    assert [chunk.contexts[s][0] for s in range(4)] == [[5, 6], [7, 8, 9], [5, 6], [7, 8, 9]]
    assert chunk.contexts[2][1] == [31, 32, 33, 34]  # the whole response, tool token included: what rescoring needs
    assert tokens.query("seq_id == 2")["position"].tolist() == [0, 2, 3]  # but the tool token (mask 0) is not measured


def test_verl_hook_without_response_mask_uses_the_attention_mask(tmp_path):
    batch = verl_batch()
    del batch.batch["response_mask"]
    dump_verl_batch(batch, step=1, out_dir=tmp_path)  # no entropys: no entropy column
    [chunk] = read([tmp_path])
    assert len(chunk.tokens) == int((batch.batch["responses"] != 0).sum())
    assert "entropy" not in chunk.tokens


def test_verl_hook_needs_rollout_log_probs(tmp_path):
    batch = verl_batch()
    del batch.batch["rollout_log_probs"]
    with pytest.raises(DumpError, match="calculate_log_probs=True"):
        dump_verl_batch(batch, step=1, out_dir=tmp_path)
