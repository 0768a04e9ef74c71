"""The GRPO loop: engine rollouts in --dtype → rewards → π_θ′ (the learner before the update) → loss
→ step → weight sync.

Mixed precision as FSDP / DeepSpeed do it: FP32 master weights hold the optimiser state; a compute
copy in --dtype runs forward and backward (on CPU, FP16 through the same faithful fast path as
rescoring); its gradients are unscaled into FP32, clipped and applied to the masters, which are
then copied into the compute model and into the live engine. With --lora-rank the masters are a
LoRA adapter's on the frozen base (`train.policy`).

With --seeds N the loop runs once per (seed, dtype), the seeds pairing the dtypes; the root's
validation.json and report.html put intervals on the differences (`stats.validation`). At step 0
and every --impact-every steps the mismatch's gradient impact is measured before the update
(`learner.impact`); the step-0 check scans step 0's prompts and compares its k3 with train's.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from mismatch import runs
from mismatch.commands.scan import run_scan
from mismatch.config import ScanConfig, TrainConfig
from mismatch.engines import lora_refused_dtypes, start_engine
from mismatch.errors import EngineError, PromptError
from mismatch.inputs.prompts import Prompt, encode_prompts, read_prompts
from mismatch.learner.losses import LOSSES, group_advantages, to_padded
from mismatch.learner.policy import FullPolicy, LoraPolicy, PolicyMemory, parameter_counts, policy_memory
from mismatch.learner.rewards import reward, rollout_rewards
from mismatch.learner.scaling import DynamicLossScaler
from mismatch.model.loading import load_tokenizer, resolve_model
from mismatch.model.precision import compute_context, default_device
from mismatch.model.rescore import pad_batch, response_logprobs, token_batches
from mismatch.records import Sampling
from mismatch.stats import metrics, validation
from mismatch.stats.growth import Growth, StepBuckets

MICRO_BATCH_TOKENS = 2048  # padded tokens per forward/backward in the learner
STEP_METRICS = (metrics.k1, metrics.k3, metrics.mean_abs_dp, metrics.max_abs_dp, metrics.min_ratio, metrics.max_ratio)


def tasks_for(config: TrainConfig) -> tuple[list[Prompt], list[str]]:
    """The prompts and the answer each one's reward is computed against."""
    tasks = read_prompts(config.prompt_set(), n=None, builtin_n=config.num_prompts, seed=config.seed)
    answers = [t.answer for t in tasks if t.answer is not None]
    if len(answers) < len(tasks):
        raise PromptError(f"{config.prompt_set()}: every row needs an 'answer' for the reward")
    return tasks, answers


@dataclass
class StepResult:
    row: dict  # the step's logged numbers
    tokens: dict = field(default_factory=dict)  # per-token μ and π_θ′ of the step's rollouts
    impact: dict | None = None  # the gradient impact measured before the update (`--impact-every`), else None


@dataclass
class Learned:
    """The loss of a learner step and the per-token numbers of its no-grad pass."""

    loss: float
    logp_old: torch.Tensor  # log π_θ′ of every response token, the rollouts end to end
    entropy: torch.Tensor  # of each position's distribution, the same layout
    impact: dict | None = None  # `rollout_impact`'s result at a measured step
    impact_time: float = 0.0  # its seconds (inside the learner step)


def engine_share(config: TrainConfig, device: torch.device, policy: LoraPolicy | FullPolicy) -> float | None:
    """vLLM's gpu_memory_utilization for the loop: as given, else (on a GPU) `share_left` of the loaded policy."""
    if config.gpu_memory_utilization is not None or device.type != "cuda":
        return config.gpu_memory_utilization
    free, total = torch.cuda.mem_get_info(device)
    return share_left(free, total, policy_memory(policy))


def share_left(free: int, total: int, policy: PolicyMemory) -> float:
    """90% of what the loaded policy leaves free once its optimiser state and gradients exist too (not
    yet allocated when the engine starts), as a share of the whole GPU (what vLLM reads it against).
    EngineError when that would not even hold the engine's copy of the weights."""
    share = round(max(0.9 * (free - policy.optimizer), 0) / total, 3)
    if share * total < policy.weights:
        raise EngineError(
            f"the policy needs {gib(policy.total)} GiB of the GPU's {gib(total)} GiB (FP32 masters"
            f" {gib(policy.masters)}, compute copy {gib(policy.compute)}, AdamW + grads {gib(policy.optimizer)}),"
            f" leaving the engine {gib(share * total)} GiB, less than its {gib(policy.weights)} GiB of weights;"
            " train a LoRA (--lora-rank), a smaller model, or on a GPU with more memory"
            " (--gpu-memory-utilization sets the engine's share by hand)"
        )
    return share


def gib(size: float) -> str:
    return f"{size / 2**30:.1f}"


def check_lora_dtypes(refused: dict[str, str]) -> None:
    """One line, before anything starts, for a LoRA run in a --dtype the engine cannot serve the adapter in."""
    if refused:
        dtypes = ", ".join(refused)
        raise EngineError(
            f"the engine cannot serve a LoRA in --dtype {dtypes}: {next(iter(refused.values()))}; drop {dtypes}"
            " from --dtype, train it without --lora-rank (full fine-tuning), or use --engine hf"
        )


class Trainer:
    """One run of the loop in one dtype: the policy (FP32 masters + compute model, `train.policy`),
    its optimiser and the live engine."""

    def __init__(
        self,
        config: TrainConfig,
        dtype: str,
        *,
        reward_fn: Callable[[str, str], float] = reward,
        live: Path | None = None,
    ):
        """`live`: where a LoRA policy writes the adapter folders the engine loads (removed at close)."""
        self.config = config
        self.dtype = dtype
        self.reward_fn = reward_fn
        self.device = default_device()
        self.model_path = resolve_model(config.model)
        self.tokenizer = load_tokenizer(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.tasks, self.answers = tasks_for(config)
        self.prompt_ids = encode_prompts(self.tokenizer, self.tasks)
        torch.manual_seed(config.seed)
        self.policy: LoraPolicy | FullPolicy
        if config.lora_rank:
            assert config.lora_alpha is not None  # TrainConfig sets it (2 × rank) when not given
            self.policy = LoraPolicy(
                self.model_path,
                dtype,
                self.device,
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                target_modules=config.lora_target_modules,
                live=live or Path(tempfile.mkdtemp(prefix="mismatch-adapter-")),
            )
        else:
            self.policy = FullPolicy(self.model_path, dtype, self.device)
        self.compute = self.policy.compute
        self.optimizer = torch.optim.AdamW(list(self.policy.masters.values()), lr=config.lr, weight_decay=0.0)
        self.scaler = DynamicLossScaler(enabled=dtype == "fp16")
        self.order = np.random.default_rng(config.seed).permutation(len(self.tasks))
        self.sleeps = config.engine == "vllm" and (
            config.sleep if config.sleep is not None else self.device.type == "cuda"
        )
        vllm_options: dict[str, Any] = {}  # the hf engine takes none (and needs no memory share)
        if config.engine == "vllm":
            vllm_options = {
                "seed": config.seed,
                "gpu_memory_utilization": engine_share(config, self.device, self.policy),
                "max_model_len": config.max_model_len,
                "sleep_mode": self.sleeps,
                "enforce_eager": config.enforce_eager,
            }
        self.engine = start_engine(
            config.engine,
            self.model_path,
            dtype,
            **self.policy.engine_options(),
            **vllm_options,
        )

    def batch_indices(self, step: int) -> list[int]:
        n = self.config.prompts_per_step
        return [int(self.order[(step * n + i) % len(self.order)]) for i in range(n)]

    def step(self, step: int) -> StepResult:
        config = self.config
        start = time.perf_counter()
        chosen = self.batch_indices(step)
        sampling = Sampling(
            temperature=config.temperature, max_tokens=config.max_tokens, seed=config.seed * 100_003 + step
        )
        rollouts = self.engine.generate([self.prompt_ids[i] for i in chosen], config.group_size, sampling)
        generated = time.perf_counter()
        if self.sleeps:
            self.engine.sleep()  # the learner step gets the engine's memory
        texts = self.tokenizer.batch_decode([r.response_ids for r in rollouts], skip_special_tokens=True)
        answers = [self.answers[i] for i in chosen]
        prompt_indices = [r.prompt_index for r in rollouts]
        rewards = torch.tensor(rollout_rewards(texts, answers, prompt_indices, reward_fn=self.reward_fn))
        advantages = group_advantages(rewards, config.group_size).to(self.device)

        lengths = [len(r.response_ids) for r in rollouts]
        logp_engine = torch.tensor(
            [lp for r in rollouts for lp in r.logp_engine], dtype=torch.float32, device=self.device
        )
        learned = self._learn(rollouts, logp_engine, advantages, step=step)
        grad_norm, finite = self._apply_gradients()
        if self.sleeps:
            torch.cuda.empty_cache()  # this process's cached blocks back to the GPU, for the engine to take
            self.engine.wake_up()
        stepped = time.perf_counter()
        if finite:
            self.sync_weights()

        mu = logp_engine.double().cpu().numpy()
        pi = learned.logp_old.double().cpu().numpy()
        row = {
            "step": step,
            "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards == 1).float().mean()),
            **{f.__name__: f(pi, mu) for f in STEP_METRICS},
            "loss": learned.loss,
            "grad_norm": grad_norm,
            "loss_scale": self.scaler.scale,
            "skipped": not finite,
            "skipped_total": self.scaler.skipped,
            "entropy": float(learned.entropy.mean()),
            "response_len": float(np.mean(lengths)),
            "step_time": time.perf_counter() - start,
            "generate_time": generated - start,
            "learn_time": stepped - generated - learned.impact_time,
            "impact_time": learned.impact_time,
            "sync_time": time.perf_counter() - stepped,
        }
        tokens = {
            "step": step,
            "seq_id": np.repeat(np.arange(len(rollouts)), lengths),
            "prompt_index": np.repeat([r.prompt_index for r in rollouts], lengths),
            "position": np.concatenate([np.arange(n) for n in lengths]),
            "token_id": np.concatenate([r.response_ids for r in rollouts]).astype(np.int64),
            "logp_engine": mu,
            "logp_trainer": pi,
            "entropy": learned.entropy.double().cpu().numpy(),
        }
        return StepResult(row, tokens, learned.impact)

    def impact_due(self, step: int) -> bool:
        """Step 0 and every --impact-every steps (never with 0)."""
        return self.config.impact_every > 0 and step % self.config.impact_every == 0

    def _learn(self, rollouts, logp_engine: torch.Tensor, advantages: torch.Tensor, *, step: int) -> Learned:
        """Backpropagate the loss through the compute copy in micro-batches; memory stays bounded.

        Pass 1 (no grad) gives log π_θ′ and the entropy; the loss's gradient with respect to each
        token's log-probability is taken there, exactly, whatever the loss. At a measured step the
        gradient impact is taken here, at θ = θ′ before any gradient exists. Pass 2 recomputes each
        micro-batch with grad and backpropagates that gradient (times the loss scale) through it.
        """
        config = self.config
        groups = list(token_batches(list(range(len(rollouts))), rollouts, MICRO_BATCH_TOKENS))
        batches = [
            pad_batch(
                [rollouts[i].prompt_ids for i in g], [rollouts[i].response_ids for i in g], self.pad_id, self.device
            )
            for g in groups
        ]
        with torch.no_grad(), compute_context(self.dtype, self.device):
            parts = [response_logprobs(self.compute, b, config.temperature, with_entropy=True) for b in batches]
        logp_old = torch.cat([p.logp for p in parts])
        entropy = torch.cat([cast(torch.Tensor, p.entropy) for p in parts])  # asked for: never None
        impact = None
        impact_time = 0.0
        if self.impact_due(step):
            started = time.perf_counter()
            impact = self._impact(rollouts, logp_old, advantages, step)
            impact_time = time.perf_counter() - started
        lengths = [len(r.response_ids) for r in rollouts]
        logp = logp_old.clone().requires_grad_()
        loss = LOSSES[config.algo](
            to_padded(logp, lengths),
            logp_old=to_padded(logp_old, lengths),
            logp_engine=to_padded(logp_engine, lengths),
            adv=advantages,
            mask=to_padded(torch.ones_like(logp_old), lengths),
        )
        (grad_logp,) = torch.autograd.grad(loss * self.scaler.scale, logp)
        self.compute.zero_grad(set_to_none=True)
        micro_grads = torch.split(grad_logp, [sum(b.lengths) for b in batches])
        for batch, grad in zip(batches, micro_grads, strict=True):
            with compute_context(self.dtype, self.device):
                micro = response_logprobs(self.compute, batch, config.temperature).logp
            micro.backward(grad)
        return Learned(loss.item(), logp_old, entropy, impact, impact_time)

    def _impact(self, rollouts, logp_old: torch.Tensor, advantages: torch.Tensor, step: int) -> dict:
        """The mismatch's gradient bias against the step's noise on this step's rollouts, at θ = θ′, with
        the loss in use; the FP32 masters as the reference gradient (a full policy in 16 bits)."""
        from mismatch.learner.impact import rollout_impact

        reference = self.policy.master if isinstance(self.policy, FullPolicy) and self.dtype != "fp32" else None
        result = rollout_impact(
            self.compute,
            self.dtype,
            rollouts,
            logp_old=logp_old,
            advantages=advantages,
            algo=self.config.algo,
            temperature=self.config.temperature,
            pad_id=self.pad_id,
            reference_model=reference,
            scale=self.scaler.scale,
            folds=min(8, self.config.prompts_per_step),
            seed=self.config.seed * 100_003 + step,
            user_batch=None,
        )
        return dict(result)

    def _apply_gradients(self) -> tuple[float, bool]:
        """Unscale the compute copy's gradients into FP32 master grads; clip and step if finite."""
        compute = dict(self.compute.named_parameters())
        grads = []
        for name, param in self.policy.masters.items():
            grad = compute[name].grad
            param.grad = None if grad is None else grad.float() if grad.dtype != torch.float32 else grad
            if param.grad is not None:
                grads.append(param.grad)
        finite = self.scaler.unscale_(grads)
        self.scaler.update(finite)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return math.nan, False
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.policy.masters.values()), self.config.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, True

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Masters → compute copy → live engine (no restart)."""
        compute = dict(self.compute.named_parameters())
        for name, param in self.policy.masters.items():
            if compute[name] is not param:
                compute[name].copy_(param)
        self.policy.sync_engine(self.engine)

    def save(self, folder: Path) -> None:
        self.policy.save(folder)
        self.tokenizer.save_pretrained(folder)

    def close(self) -> None:
        self.engine.close()
        self.policy.close()


def run_training(
    config: TrainConfig, on_step: Callable[[str, dict], None] | None = None, *, force: bool = False
) -> list[dict]:
    """One run per seed and dtype (`config.seed_list()` × `config.dtypes`, seed-major: each seed's
    dtypes share data order and sampling seeds), then validation.json and one report.html over all
    of them in `config.out`, held for the whole time (`runs.claim`). Ctrl-C ends the current run
    cleanly with what it has, and the runs after it are not started. Returns each run's summary."""
    with runs.claim(config.out, force=force):
        return _train(config, on_step)


def _train(config: TrainConfig, on_step: Callable[[str, dict], None] | None) -> list[dict]:
    from mismatch.report.training import load_runs, render_training, training_validation

    if config.lora_rank:
        check_lora_dtypes(lora_refused_dtypes(config.engine, config.dtypes))
    seeds = config.seed_list()
    folders = runs.train_layout(config.out, config.dtypes, seeds)
    summaries = []
    for (seed, dtype), folder in folders.items():
        label = dtype if len(seeds) == 1 else f"{dtype} seed {seed}"
        log_step = (lambda row, name=label: on_step(name, row)) if on_step else None
        summaries.append(
            train_one(
                replace(config, seed=seed),
                dtype,
                folder,
                on_step=log_step,
                step0_check=config.step0_check and seed == seeds[0],
            )
        )
        if summaries[-1]["interrupted"]:
            break
    done = {key: f for key, f in folders.items() if (f / runs.STEP_METRICS).is_file()}
    runs.write_json(config.out / runs.VALIDATION, dict(training_validation(load_runs(done, tokens=False))))
    runs.write_text(config.out / runs.REPORT_HTML, render_training(done))
    return summaries


def train_one(
    config: TrainConfig,
    dtype: str,
    out: Path,
    *,
    on_step: Callable[[dict], None] | None = None,
    reward_fn: Callable[[str, str], float] = reward,
    step0_check: bool = False,
) -> dict:
    """Train in `dtype` into `out`: metrics.csv after every step; at the end metrics.parquet,
    tokens.parquet (μ and π_θ′ per token and step), checkpoints and summary.json; impact.jsonl and
    summary.json `impact` at the measured steps. With `step0_check`, once the run is complete, the
    step-0 check (`check_step0`) into summary.json `step0_check`."""
    log = runs.RunLog(out, "train", config.to_json(dtype))
    trainer = Trainer(config, dtype, reward_fn=reward_fn, live=out / runs.LIVE_ADAPTER)
    log.summary["policy"] = parameter_counts(trainer.policy)
    log.summary["engine_execution"] = trainer.engine.execution  # eager or compiled graphs, as the engine resolved it
    first_tasks = [trainer.tasks[i] for i in trainer.batch_indices(0)]
    rows: list[dict] = []
    tokens: list[pd.DataFrame] = []
    impacts: list[dict] = []
    interrupted = False
    try:
        for step in range(config.steps):
            result = trainer.step(step)
            rows.append(result.row)
            tokens.append(pd.DataFrame(result.tokens))
            runs.write_train_steps(out, rows)
            if result.impact is not None:
                impacts.append({"step": step, **result.impact})
                runs.write_jsonl(out / runs.IMPACT, impacts)
                log.summary["impact"] = impacts
                log.save()
            if on_step:
                on_step(result.row)
            if config.save_every and (step + 1) % config.save_every == 0:
                trainer.save(out / f"checkpoint-{step + 1}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        trainer.close()
    runs.write_train_steps(out, rows, final=True)
    if tokens:
        runs.write_parquet(
            out / runs.TOKENS, pd.concat(tokens, ignore_index=True).assign(engine_dtype=dtype, trainer_dtype=dtype)
        )
    log.summary["growth"] = training_growth(tokens, seed=config.seed)
    trainer.save(out / "checkpoint-final")
    log.summary |= {"interrupted": interrupted, "steps_done": len(rows)}
    log.finish(complete=not interrupted)
    if step0_check and tokens and not interrupted:
        try:
            with log.stage("step0_check"):
                log.summary["step0_check"] = check_step0(config, dtype, out, tasks=first_tasks, tokens=tokens[0])
        except KeyboardInterrupt:  # the run is complete; the runs after it are not started
            log.summary |= {"step0_check": {"dtype": dtype, "skipped": "interrupted (Ctrl-C)"}, "interrupted": True}
            log.save()
    return log.summary


def training_growth(tokens: list[pd.DataFrame], *, seed: int) -> Growth | None:
    """Why k3 grew from the run's first steps to its final window (`stats.growth`), over the trainer's
    entropy at each token; None under 2 steps."""
    buckets = StepBuckets()
    for frame in tokens:
        buckets.add(
            int(frame["step"].to_numpy()[0]),
            frame["logp_trainer"],
            frame["logp_engine"],
            frame["entropy"],
            frame["seq_id"],
        )
    return buckets.growth(seed=seed)


def step0_sampling_seed(config: TrainConfig) -> int:
    """The step-0 scan's sampling seed: one no step of the run samples with (step s uses seed·100003 + s)."""
    return config.seed * 100_003 + config.steps


def check_step0(config: TrainConfig, dtype: str, out: Path, *, tasks: list[Prompt], tokens: pd.DataFrame) -> dict:
    """The step-0 check: a real scan (engine and trainer in `dtype`, no FP32 reference, no impact) of step 0's
    prompts with the run's group size, max tokens and temperature, a sample independent of
    train's, into OUT/step0-scan/; its k3 against train's step-0 k3 between μ and π_θ′
    (`stats.validation.step0_check`). A LoRA run is not checked: the scan would serve the
    base model, not the adapter's LoRA request."""
    if config.lora_rank:
        return {"dtype": dtype, "skipped": "a LoRA run: its engine serves a LoRA request, a scan of the base does not"}
    prompts = out / runs.STEP0_PROMPTS
    runs.write_jsonl(prompts, [{"messages": list(t.messages), "answer": t.answer} for t in tasks])
    seed = step0_sampling_seed(config)
    scan = ScanConfig(
        model=config.model,
        engine=config.engine,
        dtypes=[dtype],
        out=out / runs.STEP0_SCAN,
        sampling=Sampling(temperature=config.temperature, max_tokens=config.max_tokens, seed=seed),
        prompts=prompts,
        samples=config.group_size,
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enforce_eager=config.enforce_eager,
        semantic_probe=0,
        reference="none",
        impact=False,
    )
    run_scan(scan, force=True)
    scanned = runs.load_scan(scan.out).tokens
    scanned = scanned[(scanned["engine_dtype"] == dtype) & (scanned["trainer_dtype"] == dtype)]
    check = validation.step0_check(
        dtype,
        validation.k3_clusters(tokens["logp_trainer"], tokens["logp_engine"], tokens["prompt_index"]),
        validation.k3_clusters(scanned["logp_trainer"], scanned["logp_engine"], scanned["prompt_index"]),
        seed=seed,
    )
    return dict(check) | {"scan": runs.STEP0_SCAN, "sampling_seed": seed}
