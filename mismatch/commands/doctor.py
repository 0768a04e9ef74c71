"""`run_doctor`: the self-check to run first on a new machine. On tiny random models built from a
config in a temporary folder (no network), each capability the commands rely on is tried for real,
one engine per dtype, each started once: a row per check says pass, fail (with the one-line
reason) or not on this platform (with vLLM's reason).

The numbers compared are the commands' own: μ from `engine.generate` (vLLM's processed log-probs),
the engine's prefill `score`, π from `model.rescore.rescore` in FP32, the MoE experts from
`Rollout.routed_experts` against `model.routing.response_routing`.
"""

from __future__ import annotations

import copy
import functools
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from mismatch.engines import Engine, start_engine
from mismatch.engines.vllm_support import VLLM_RANGE, installed_vllm, range_notice
from mismatch.errors import EngineError, first_line
from mismatch.inputs.prompts import Prompt, encode_prompts
from mismatch.model.loading import load_tokenizer
from mismatch.model.lora import new_adapter
from mismatch.model.precision import cpu_class
from mismatch.model.rescore import load_trainer, rescore
from mismatch.model.routing import response_routing, same_experts
from mismatch.model.tiny import TINY_MOE, build_from_config, build_tiny
from mismatch.records import Rollout, Sampling

Status = Literal["pass", "fail", "not on this platform"]
PASS: Status = "pass"
FAIL: Status = "fail"
NOT_HERE: Status = "not on this platform"

TEMPERATURE = 0.7  # μ must be the log-prob under the tempered distribution sampled from, not the raw one
SAMPLING = Sampling(temperature=TEMPERATURE, max_tokens=16, seed=0)
PROMPTS = ("What is 3 + 4?", "What is 12 + 30?", "the model answers", "What is 7 + 77?")
SAMPLES = 2
PARITY_TOL = 1e-3  # max |Δ log p| of engine and trainer in FP32 (the scan's semantic floor is ~1e-6 on CPU)
ROUTING_AGREEMENT = 0.95  # share of (token, MoE layer) whose experts an FP32 engine and trainer agree on
MAX_MODEL_LEN = 256  # the tiny models' prompts and responses fit; a small KV cache to profile on a GPU
SLEEP_REFUSED = "Sleep mode is not supported"  # vLLM's refusal (vllm/config/model.py) where the platform lacks it


@dataclass(frozen=True)
class CheckRow:
    check: str
    status: Status
    detail: str  # what was measured (pass), the one-line reason (fail, not on this platform)


@dataclass(frozen=True)
class DoctorResult:
    platform: dict[str, str]
    checks: list[CheckRow]
    seconds: float

    @property
    def exit_code(self) -> int:
        return exit_code(self.checks)


class Failed(Exception):
    """A capability ran and gave the wrong answer: the message is the row's reason."""


class NotHere(Exception):
    """The platform refuses a capability (the engine's reason is the message)."""


def exit_code(rows: Sequence[CheckRow]) -> int:
    """1 when any check failed, else 0 (a capability the platform lacks is not a failure)."""
    return 1 if any(row.status == FAIL for row in rows) else 0


def check_row(check: str, attempt: Callable[[], str]) -> CheckRow:
    """Run one check: what `attempt` returns is the pass detail; `NotHere` → not on this platform;
    anything raised → fail with its first line (a self-check reports every failure as a row)."""
    try:
        return CheckRow(check, PASS, attempt())
    except NotHere as exc:
        return CheckRow(check, NOT_HERE, str(exc))
    except Failed as exc:
        return CheckRow(check, FAIL, str(exc))
    except Exception as exc:
        return CheckRow(check, FAIL, reason(exc))


def reason(exc: Exception) -> str:
    """An exception as one line: its first line, or the last where the first only introduces a
    traceback (a crash in the engine process)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[-1] if len(lines) > 1 and lines[0].endswith(":") else first_line(exc)
    return f"{type(exc).__name__}: {line}"


def platform_facts() -> dict[str, str]:
    """CPU class, GPU, torch and vLLM versions (and whether vLLM is in the range the code was read against)."""
    gpu = (
        f"{torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}, CUDA {torch.version.cuda}"
        if torch.cuda.is_available()
        else "none"
    )
    found = installed_vllm()
    vllm = "not installed"
    if found:
        place = "outside" if range_notice(*found) else "inside"
        vllm = f"{found[1]} ({found[0]}), {place} the range this code was read against ({VLLM_RANGE})"
    return {
        "platform": f"{platform.system()} {platform.machine()}, CPU class {cpu_class()}",
        "GPU": gpu,
        "torch": torch.__version__,
        "vLLM": vllm,
    }


def row_line(row: CheckRow) -> str:
    """A check as the terminal shows it: status, check, detail."""
    return f"{row.status:<20}  {row.check:<22}  {row.detail}"


def flat(values: Sequence[Sequence[float]] | Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in values]) if values else np.zeros(0)


def max_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b))) if len(a) else float("nan")


def generated(rollouts: Sequence[Rollout], vocab: int) -> str:
    """One generate's sanity: every request answered, tokens in the vocabulary, μ finite and ≤ 0."""
    mu = flat([r.logp_engine for r in rollouts])
    ids = [t for r in rollouts for t in r.response_ids]
    if len(rollouts) != len(PROMPTS) * SAMPLES or not ids:
        raise Failed(f"{len(rollouts)} responses, {len(ids)} tokens for {len(PROMPTS) * SAMPLES} requests")
    if any(len(r.logp_engine) != len(r.response_ids) for r in rollouts):
        raise Failed("a response's log-probs and tokens differ in number")
    if not all(0 <= t < vocab for t in ids):
        raise Failed("a token id outside the vocabulary")
    if not (np.isfinite(mu).all() and (mu <= 1e-6).all()):
        raise Failed("a log-prob μ that is not finite or above 0")
    return f"{len(ids)} tokens, mean log μ {mu.mean():.3f}"


def processed_logprobs(mu: np.ndarray, pi_tempered: np.ndarray, pi_raw: np.ndarray) -> str:
    """μ is the log-prob under the distribution sampled from (temperature applied): nearer the
    trainer's π at that temperature than at T = 1, by an order of magnitude."""
    tempered, raw = max_gap(mu, pi_tempered), max_gap(mu, pi_raw)
    if not tempered * 10 <= raw:
        raise Failed(f"μ is not the tempered log-prob: max |μ − π| {tempered:.2e} at T={TEMPERATURE}, {raw:.2e} at T=1")
    return f"μ at T={TEMPERATURE} matches π at T={TEMPERATURE} (max |Δ| {tempered:.1e}; at T=1: {raw:.1e})"


def parity(engine_logp: np.ndarray, trainer_logp: np.ndarray, what: str) -> str:
    """Engine and trainer in FP32 on the same tokens: max |Δ log p| within PARITY_TOL."""
    gap = max_gap(engine_logp, trainer_logp)
    if not gap <= PARITY_TOL:
        raise Failed(f"{what}: max |Δ log p| {gap:.2e} over {PARITY_TOL:g}")
    return f"{what}: max |Δ log p| {gap:.1e}, mean {np.mean(np.abs(engine_logp - trainer_logp)):.1e}"


def synced(mu: np.ndarray, pi_new: np.ndarray, pi_old: np.ndarray) -> str:
    """After load_weights the engine's μ follows the new weights: π of the perturbed trainer, not the old."""
    new, old = max_gap(mu, pi_new), max_gap(mu, pi_old)
    if not (new <= PARITY_TOL and old >= 10 * new):
        raise Failed(f"μ after the sync: max |Δ| {new:.2e} to the new weights' π, {old:.2e} to the old")
    return f"μ follows the new weights (max |Δ| {new:.1e}; to the old weights' π {old:.1e})"


def adapter_applied(mu: np.ndarray, pi_adapter: np.ndarray, pi_base: np.ndarray) -> str:
    """A 16-bit engine's μ is nearer the FP32 trainer with the adapter than without, by 2× in mean |Δ|."""
    with_adapter, base = float(np.mean(np.abs(mu - pi_adapter))), float(np.mean(np.abs(mu - pi_base)))
    if not with_adapter * 2 <= base:
        raise Failed(f"the adapter does not show in μ: mean |Δ| {with_adapter:.2e} with it, {base:.2e} without")
    return f"μ follows the adapter (mean |Δ| {with_adapter:.1e}; without it {base:.1e})"


def routing_agreement(engine: Sequence[np.ndarray | None], trainer: Sequence[np.ndarray], layers: list[int]) -> str:
    """The engine's recorded experts ([tokens, decoder layers, k]) agree with the FP32 trainer's."""
    if any(rows is None for rows in engine):
        raise Failed("no routing recorded for a response")
    same = np.concatenate(
        [same_experts(np.asarray(e)[:, layers], t).ravel() for e, t in zip(engine, trainer, strict=True)]
    )
    share = float(same.mean()) if len(same) else 0.0
    if share < ROUTING_AGREEMENT:
        raise Failed(f"engine and FP32 trainer agree on {share:.0%} of routed (token, layer)s")
    return f"{len(same)} (token, layer)s recorded, {share:.0%} as the FP32 trainer routes"


def sleep_refused(error: Exception) -> bool:
    """Whether an engine start failed because the platform has no vLLM sleep mode."""
    return SLEEP_REFUSED in str(error)


def perturbed(state: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """The MLP weights moved by noise (embeddings left: tied to the output head)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: t + 0.05 * torch.randn(t.shape, generator=generator).to(t) if ".mlp." in name else t
        for name, t in state.items()
    }


class Doctor:
    """The tiny dense model, its FP32 trainer and prompts; each method one engine and its checks."""

    def __init__(self, folder: Path, on_row: Callable[[CheckRow], None]):
        self.on_row = on_row
        self.model = build_tiny(folder / "dense")
        self.tokenizer = load_tokenizer(self.model)
        self.prompts = encode_prompts(self.tokenizer, [Prompt.from_text(text) for text in PROMPTS])
        self.trainer = load_trainer(self.model, "fp32")
        self.folder = folder

    def add(self, check: str, attempt: Callable[[], str]) -> CheckRow:
        row = check_row(check, attempt)
        self.on_row(row)
        return row

    def pi(self, model, rollouts: Sequence[Rollout], temperature: float) -> np.ndarray:
        scored = rescore(model, "fp32", rollouts, temperature, pad_id=self.tokenizer.pad_token_id)
        return flat(scored["logp_trainer"])

    def generate(self, engine: Engine) -> list[Rollout]:
        return engine.generate(self.prompts, SAMPLES, SAMPLING)

    @contextmanager
    def engine(self, check: str, model: Path, dtype: str, **options) -> Iterator[Engine | None]:
        """An engine started under its own check row (None when it did not start), closed after."""
        started: list[Engine] = []

        def start() -> str:
            began = time.perf_counter()
            started.append(start_engine("vllm", model, dtype, max_model_len=MAX_MODEL_LEN, **options))
            return f"started in {time.perf_counter() - began:.1f} s"

        self.add(check, start)
        try:
            yield started[0] if started else None
        finally:
            for engine in started:
                engine.close()

    def dtype_engine(self, dtype: str) -> None:
        with self.engine(f"engine start {dtype}", self.model, dtype) as engine:
            if engine is not None:
                self.add(f"generate {dtype}", lambda: generated(self.generate(engine), len(self.tokenizer)))

    def fp32_engine(self) -> None:
        """Started with sleep mode where vLLM offers it (else without, the sleep check then not on
        this platform); the log-prob, scoring, sleep and weight sync checks run on it."""
        started: list[Engine] = []
        sleep_reason: list[str] = []

        def start() -> str:
            began = time.perf_counter()
            try:
                started.append(start_engine("vllm", self.model, "fp32", max_model_len=MAX_MODEL_LEN, sleep_mode=True))
                return f"started in {time.perf_counter() - began:.1f} s (sleep mode)"
            except EngineError as exc:
                if not sleep_refused(exc):
                    raise
                sleep_reason.append(f"vLLM: {first_line(exc).removeprefix('vLLM could not start: ')}")
            began = time.perf_counter()
            started.append(start_engine("vllm", self.model, "fp32", max_model_len=MAX_MODEL_LEN))
            return f"started in {time.perf_counter() - began:.1f} s (without sleep mode: not on this platform)"

        self.add("engine start fp32", start)
        try:
            if started:
                self.fp32_checks(started[0], sleep_reason[0] if sleep_reason else None)
        finally:
            for engine in started:
                engine.close()

    def fp32_checks(self, engine: Engine, sleep_reason: str | None) -> None:
        rollouts: list[Rollout] = []

        def generate() -> str:
            rollouts.extend(self.generate(engine))
            return generated(rollouts, len(self.tokenizer))

        if self.add("generate fp32", generate).status != PASS:
            return
        mu = flat([r.logp_engine for r in rollouts])

        @functools.cache
        def pi(temperature: float) -> np.ndarray:  # the FP32 trainer on these rollouts, once per temperature
            return self.pi(self.trainer, rollouts, temperature)

        self.add("processed log-probs", lambda: processed_logprobs(mu, pi(TEMPERATURE), pi(1.0)))
        self.add("FP32 parity", lambda: parity(mu, pi(TEMPERATURE), f"decode at T={TEMPERATURE}, {len(mu)} tokens"))

        def prefill() -> str:
            scored = engine.score([(r.prompt_ids, r.response_ids) for r in rollouts])
            return parity(flat([s.logp for s in scored]), pi(1.0), "engine.score")

        self.add("prefill scoring", prefill)

        def sleep_and_wake() -> str:
            if sleep_reason is not None:
                raise NotHere(sleep_reason)
            engine.sleep()
            engine.wake_up()
            again = self.generate(engine)
            if [r.response_ids for r in again] != [r.response_ids for r in rollouts]:
                raise Failed("after wake_up the same seeds sample other tokens")
            return parity(flat([r.logp_engine for r in again]), mu, "μ after sleep and wake_up against before")

        self.add("sleep and wake", sleep_and_wake)

        def weight_sync() -> str:
            policy = copy.deepcopy(self.trainer)
            policy.load_state_dict(perturbed(policy.state_dict()))
            engine.load_weights({name: t.detach() for name, t in policy.state_dict().items()})
            after = self.generate(engine)
            return synced(
                flat([r.logp_engine for r in after]),
                self.pi(policy, after, TEMPERATURE),
                self.pi(self.trainer, after, TEMPERATURE),
            )

        self.add("weight sync", weight_sync)

    def lora_engine(self) -> None:
        """The BF16 engine (the dtype every vLLM LoRA kernel takes), started with a fresh adapter whose B
        is moved off zero so that it changes the model: generate, and the adapter's effect in μ."""
        adapter = self.folder / "adapter"
        peft = new_adapter(copy.deepcopy(self.trainer), rank=8, alpha=16, target_modules=["all-linear"])
        generator = torch.Generator().manual_seed(2)
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.data = 0.2 * torch.randn(p.shape, generator=generator)
        peft.save_pretrained(adapter)
        with self.engine("engine start bf16", self.model, "bf16", lora=adapter) as engine:
            if engine is None:
                return
            rollouts: list[Rollout] = []

            def generate() -> str:
                rollouts.extend(self.generate(engine))
                return generated(rollouts, len(self.tokenizer)) + " (LoRA applied)"

            if self.add("generate bf16", generate).status != PASS:
                return

            def request() -> str:
                mu = flat([r.logp_engine for r in rollouts])
                applied = load_trainer(self.model, "fp32", lora=adapter)
                pi_adapter = self.pi(applied, rollouts, TEMPERATURE)
                return adapter_applied(mu, pi_adapter, self.pi(self.trainer, rollouts, TEMPERATURE))

            self.add("LoRA request", request)

    def moe(self) -> None:
        folder = build_from_config(self.folder / "moe", self.tokenizer, *TINY_MOE)
        with self.engine("MoE engine start fp32", folder, "fp32", record_routing=True) as engine:
            if engine is None:
                return

            def record() -> str:
                rollouts = self.generate(engine)
                trainer = response_routing(load_trainer(folder, "fp32"), rollouts, self.tokenizer.pad_token_id)
                return routing_agreement([r.routed_experts for r in rollouts], trainer.experts, trainer.layers)

            self.add("MoE routing record", record)


def run_doctor(
    *,
    on_platform: Callable[[dict[str, str]], None] = lambda facts: None,
    on_row: Callable[[CheckRow], None] = lambda row: None,
) -> DoctorResult:
    """Every check, each row handed to `on_row` as it is decided (the platform's facts to
    `on_platform` first); the rows and the wall time."""
    began = time.perf_counter()
    facts = platform_facts()
    on_platform(facts)
    if installed_vllm() is None:
        row = CheckRow("vLLM installed", FAIL, 'not installed: pip install -e ".[gpu]" (GPU) or ".[cpu]" (CPU)')
        on_row(row)
        return DoctorResult(facts, [row], time.perf_counter() - began)
    rows: list[CheckRow] = []

    def add(row: CheckRow) -> None:
        rows.append(row)
        on_row(row)

    with tempfile.TemporaryDirectory(prefix="mismatch-doctor-") as folder:
        try:
            doctor = Doctor(Path(folder), add)
        except Exception as exc:
            add(CheckRow("tiny model and FP32 trainer", FAIL, reason(exc)))
            return DoctorResult(facts, rows, time.perf_counter() - began)
        stages: dict[str, Callable[[], None]] = {
            "bf16 engine with a LoRA adapter": doctor.lora_engine,
            "fp16 engine": lambda: doctor.dtype_engine("fp16"),
            "fp32 engine": doctor.fp32_engine,
            "MoE engine": doctor.moe,
        }
        for stage, run in stages.items():
            try:
                run()
            except Exception as exc:  # outside a check (building an adapter, a model): the stage's own row
                add(CheckRow(stage, FAIL, reason(exc)))
    return DoctorResult(facts, rows, time.perf_counter() - began)
