"""Dump μ and π from a TRL `GRPOTrainer` run: one open-format file per optimizer step and rank.

Use `MismatchGRPOTrainer` where you used `GRPOTrainer` (same arguments, plus an optional
`mismatch_dir`, default `<output_dir>/mismatch`), train as usual, then run
`mismatch analyze <output_dir>/mismatch`. Without vLLM, μ comes from HF `generate`'s processed
scores, so the hook also runs on CPU. Written against TRL 1.16 (it overrides private methods).
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
from trl import GRPOConfig, GRPOTrainer

from mismatch.dumps.writer import StepWriter
from mismatch.errors import DumpError

GROUP_KEY = "mismatch_prompt_index"  # added to TRL's batch dict so the group survives the shuffle


class MismatchDumpMixin(GRPOTrainer):
    """Writes, per optimizer step, each sequence's prompt ids, completion (up to its padding), μ, π,
    GRPO group and temperature; with tool calls, `loss_mask` = tool_mask marks the sampled tokens,
    so only those are measured while the whole completion stays the context for rescoring.

    μ: `sampling_per_token_logps` (vLLM's processed logprobs; without vLLM, HF generate's
    processed scores, i.e. after temperature/top-k/top-p). π: `old_per_token_logps` where TRL
    computes it (vLLM importance sampling, or generation not aligned with optimizer steps): the
    trainer's forward at sampling time. Otherwise the loss forward's `per_token_logps`, but only
    for micro-batches still under the sampling policy (no optimizer step since their generation);
    later ones are skipped, since π − μ would measure policy lag, not the engine. `entropy`: the loss
    forward's entropies (TRL's, of the tempered distribution), for micro-batches under the sampling
    policy. Each sequence is written once, at its first use (`num_iterations` > 1 reuses it). `step`
    is the optimizer step the micro-batch feeds, `global_step + 1`, so with `steps_per_generation` > gradient
    accumulation one group can spread over several steps. To add it to your own `GRPOTrainer`
    subclass, list it first among the bases.
    """

    args: GRPOConfig  # what GRPOTrainer is given (transformers' Trainer annotates its base class)

    def __init__(self, *args, mismatch_dir: str | Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.args.output_dir is not None  # TrainingArguments fills in its default
        self.mismatch_dir = Path(mismatch_dir) if mismatch_dir is not None else Path(self.args.output_dir) / "mismatch"
        self._mismatch_writer = StepWriter(
            self.mismatch_dir, self.accelerator.process_index, self.accelerator.num_processes
        )
        self._mismatch_generations = 0  # generation batches so far: keeps group numbers unique across them
        self._mismatch_policy_step: int | None = None  # global_step when the buffered batch was sampled
        self._mismatch_pi: torch.Tensor | None = None
        self._mismatch_entropy: torch.Tensor | None = None

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self._mismatch_writer.flush()  # the writer writes a step when the next begins: write the last one
        return output

    def _generate_single_turn(self, *args, **kwargs):
        """TRL's, with its arguments as TRL passes them."""
        if self.use_vllm or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(*args, **kwargs)
        # TRL's HF path returns no logprobs: have generate keep its processed scores and take the sampled tokens'.
        model = self.accelerator.unwrap_model(self.model_wrapped)
        generate = model.generate
        stash: dict[str, torch.Tensor] = {}

        def generate_with_scores(*gen_args, **gen_kwargs):
            out = generate(*gen_args, output_scores=True, return_dict_in_generate=True, **gen_kwargs)
            tokens = out.sequences[:, -len(out.scores) :]
            logps = [
                torch.log_softmax(s.float(), dim=-1).gather(-1, tokens[:, t, None]) for t, s in enumerate(out.scores)
            ]
            stash["logps"] = torch.cat(logps, dim=1).cpu()
            return out.sequences

        with mock.patch.object(model, "generate", generate_with_scores):
            completion_ids, _ = super()._generate_single_turn(*args, **kwargs)
        # TRL cut each completion after its first EOS; it pads these lists into inputs["sampling_per_token_logps"].
        return completion_ids, [stash["logps"][i, : len(ids)].tolist() for i, ids in enumerate(completion_ids)]

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self._mismatch_training():
            # Before TRL shuffles, the global batch is consecutive groups of num_generations rows, and this
            # rank holds rows [rank·n, (rank+1)·n) (TRL's own advantage slicing assumes the same).
            n = len(inputs)
            world = self.accelerator.num_processes
            rows = (self._mismatch_generations * world + self.accelerator.process_index) * n + torch.arange(n)
            output[GROUP_KEY] = rows // self.num_generations
            self._mismatch_generations += 1
            self._mismatch_policy_step = self.state.global_step
        return output

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        output = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self._mismatch_pi = output[0].detach()  # the last call inside _compute_loss is the loss forward
        self._mismatch_entropy = None if output[1] is None else output[1].detach()  # TRL's loss forward computes it
        return output

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        steps = self.args.steps_per_generation
        assert steps is not None  # GRPOConfig derives it when not given
        if self._mismatch_training() and self._step % (steps * self.num_iterations) < steps:  # first use
            self._mismatch_record(inputs)
        return loss

    def _mismatch_training(self) -> bool:
        """Whether the model trains (not evaluation)."""
        assert self.model is not None  # Trainer.__init__ sets it
        return self.model.training

    def _mismatch_record(self, inputs: dict) -> None:
        mu = inputs.get("sampling_per_token_logps")
        if mu is None:
            raise DumpError(
                "the generation backend returned no log-probs (μ); "
                "use vLLM or TRL's plain HF generate, not continuous batching"
            )
        sampling_policy = self.state.global_step == self._mismatch_policy_step  # the loss forward's weights sampled
        pi = inputs.get("old_per_token_logps")
        if pi is None:
            if not sampling_policy:
                return  # the policy moved since sampling: π − μ would be policy lag
            pi = self._mismatch_pi
            assert pi is not None  # the loss forward of this micro-batch ran (`_compute_loss` records after it)
        entropy = (
            self._mismatch_entropy.float().cpu() if sampling_policy and self._mismatch_entropy is not None else None
        )
        valid = inputs["completion_mask"].bool().cpu()  # the completion before padding (tool output included)
        sampled = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).bool().cpu()
        mu = mu.float().cpu()
        pi = pi.float().cpu()
        prompt_ids = inputs["prompt_ids"].cpu()
        prompt_mask = inputs["prompt_mask"].bool().cpu()
        completion_ids = inputs["completion_ids"].cpu()
        keep = [i for i in range(len(sampled)) if sampled[i].any()]  # mask_truncated_completions can mask a whole row
        self._mismatch_writer.add(
            self.state.global_step + 1,
            prompt_ids=[prompt_ids[i][prompt_mask[i]].tolist() for i in keep],
            response_ids=[completion_ids[i][valid[i]].tolist() for i in keep],
            logp_engine=[mu[i][valid[i]].tolist() for i in keep],
            logp_trainer=[pi[i][valid[i]].tolist() for i in keep],
            prompt_index=inputs[GROUP_KEY][keep].tolist(),
            temperature=self.args.temperature,
            loss_mask=[sampled[i][valid[i]].tolist() for i in keep] if "tool_mask" in inputs else None,
            entropy=[entropy[i][valid[i]].tolist() for i in keep] if entropy is not None else None,
        )


class MismatchGRPOTrainer(MismatchDumpMixin):
    """`GRPOTrainer` that dumps μ and π per optimizer step to `mismatch_dir` (see `MismatchDumpMixin`)."""
