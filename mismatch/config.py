"""Settings of each command as plain values, checked on construction.

A library caller (the bench, a notebook) gets the same one-line `ConfigError` the CLI prints, so
no range check lives in the CLI. Lists may be given as comma-separated text ("bf16,fp16").
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mismatch.engines import ENGINES
from mismatch.errors import ConfigError
from mismatch.model.lora import read_adapter, vllm_max_rank
from mismatch.records import Sampling, parse_dtypes
from mismatch.stats.corrections import with_thresholds
from mismatch.verdict.gate import Condition, check_pairs, parse_condition

REFERENCE_DTYPE = "fp32"
DEFAULT_NUM_PROMPTS = 64  # for the built-in arithmetic set; a prompt file is used whole
PAIR_MODES = ("default", "all")
ALGOS = ("grpo", "gspo", "token-tis", "seq-mis", "pg-seq-is")  # mismatch.learner.losses.LOSSES


def _at_least(name: str, value: int | None, least: int = 1) -> None:
    if value is not None and value < least:
        raise ConfigError(f"{name} must be at least {least}")


def _check_sampling(sampling: Sampling) -> None:
    if not (sampling.temperature > 0 and math.isfinite(sampling.temperature)):
        raise ConfigError(
            "--temperature must be > 0: RL samples at T > 0 and the mismatch is measured on sampled tokens"
        )
    if not 0 < sampling.top_p <= 1:
        raise ConfigError("--top-p must be in (0, 1]")
    _at_least("--max-tokens", sampling.max_tokens)


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")


def _dtypes(value: str | list[str]) -> list[str]:
    return parse_dtypes(value if isinstance(value, str) else ",".join(value))


def _json(config) -> dict:
    """A config's fields as summary.json records them: paths (also in lists) as text."""

    def text(value):
        return str(value) if isinstance(value, Path) else value

    return {k: [text(x) for x in v] if isinstance(v, list) else text(v) for k, v in asdict(config).items()}


def pairs_mode(text: str) -> bool:
    """`--pairs`: "default" → False, "all" → True (every engine × trainer dtype)."""
    if text not in PAIR_MODES:
        raise ConfigError(f"--pairs must be 'default' or 'all', not {text!r}")
    return text == "all"


@dataclass
class ScanConfig:
    model: str
    engine: str
    dtypes: list[str]  # engine dtypes
    out: Path
    sampling: Sampling = field(default_factory=Sampling)
    all_pairs: bool = False
    prompts: Path | None = None
    num_prompts: int | None = None
    samples: int = 1
    chat_template: bool = True
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    trust_remote_code: bool = False
    fail_on: list[str] = field(default_factory=list)  # CI gate conditions (mismatch.verdict.gate)
    strict: bool = False  # fail, instead of skipping, on prompts that do not fit the context
    semantic_probe: int = 4  # prompts the FP32 engine generates for the FP32-vs-FP32 probe (0: skip)
    reference: str = "all"  # the FP32 trainer reference: "all" sequences, "none", or the first N per engine dtype
    lora: Path | None = None  # a PEFT LoRA adapter folder: scanned applied by each side, and merged

    def __post_init__(self):
        self.dtypes = _dtypes(self.dtypes)
        if self.lora is not None:
            self.lora = Path(self.lora)
            read_adapter(self.lora)
        _check_engine(self.engine)
        _check_sampling(self.sampling)
        _at_least("--samples", self.samples)
        _at_least("--num-prompts", self.num_prompts)
        _at_least("--tensor-parallel-size", self.tensor_parallel_size)
        _at_least("--pipeline-parallel-size", self.pipeline_parallel_size)
        _at_least("--semantic-probe", self.semantic_probe, 0)
        self.reference_sequences()
        check_pairs(self.conditions(), self.pairs())

    def conditions(self) -> list[Condition]:
        """The parsed `--fail-on` gate."""
        return [parse_condition(text) for text in self.fail_on]

    def reference_sequences(self) -> int | None:
        """How many sequences per engine dtype the FP32 trainer reference scores: None for all, 0 for none."""
        if self.reference in ("all", "none"):
            return None if self.reference == "all" else 0
        if not self.reference.isdigit() or int(self.reference) < 1:
            raise ConfigError(f"--reference must be all, none or a number of sequences ≥ 1, not {self.reference!r}")
        return int(self.reference)

    def pairs(self) -> list[tuple[str, str]]:
        """Each engine dtype against itself and FP32 (or against every dtype with `all_pairs`); with
        `--reference none`, FP32 stays a trainer only for an FP32 engine."""
        reference = [] if self.reference == "none" else [REFERENCE_DTYPE]
        trainers = list(dict.fromkeys([*self.dtypes, *reference]))
        return [(e, t) for e in self.dtypes for t in (trainers if self.all_pairs else dict.fromkeys([e, *reference]))]

    def vllm_options(self) -> dict:
        """What `start_engine` passes to `vllm.LLM` (nothing for the hf engine)."""
        if self.engine != "vllm":
            return {}
        return {
            "seed": self.sampling.seed,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }

    def to_json(self) -> dict:
        return _json(self) | {"pairs": [list(p) for p in self.pairs()]}


@dataclass
class TrainConfig:
    model: str
    engine: str
    dtypes: list[str]  # one run per dtype, same seed and data order (`--compare`)
    out: Path  # the run folder; with several dtypes, the root of one folder per dtype
    steps: int = 20
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 96
    temperature: float = 1.0
    lr: float = 2e-6
    grad_clip: float = 1.0
    algo: str = "grpo"
    seed: int = 0
    save_every: int = 0
    prompts: Path | None = None
    num_prompts: int = 256
    gpu_memory_utilization: float | None = None  # the engine's share; None: 90% of what the policy leaves free (GPU)
    max_model_len: int | None = None
    sleep: bool | None = None  # vLLM sleep mode during the learner step; None: on GPU only
    lora_rank: int = 0  # 0: full fine-tuning; else the policy is a PEFT LoRA of this rank on the frozen base
    lora_alpha: float | None = None  # None: 2 × rank
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"]
    )  # PEFT's names; all-linear: every linear layer but the head

    def __post_init__(self):
        self.dtypes = _dtypes(self.dtypes)
        _check_engine(self.engine)
        _at_least("--lora-rank", self.lora_rank, 0)
        vllm_max_rank(self.lora_rank, f"--lora-rank {self.lora_rank}")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        if self.algo not in ALGOS:
            raise ConfigError(f"unknown --algo {self.algo!r}; use one of {', '.join(ALGOS)}")
        _check_sampling(Sampling(temperature=self.temperature, max_tokens=self.max_tokens))
        for name, value, least in (
            ("--steps", self.steps, 1),
            ("--prompts-per-step", self.prompts_per_step, 1),
            ("--group-size", self.group_size, 2),
        ):
            _at_least(name, value, least)
        _at_least("--save-every", self.save_every, 0)

    def to_json(self, dtype: str) -> dict:
        """The settings of the run in `dtype` (what its summary.json records)."""
        return _json(self) | {"dtype": dtype}


@dataclass
class DiagnoseConfig(ScanConfig):
    """A scan's settings, plus where its rollouts come from and how much to look at.

    The engine scores given sequences only in prefill, where vLLM applies no sampling processor
    (its prompt log-probs are raw), so every component is measured at temperature 1 and top-p 1.
    """

    from_run: Path | None = None  # reuse a scan's rollouts instead of generating
    topk: int = 20  # the engine's top-k log-probs compared with the trainer's distribution
    layer_sequences: int = 8  # sequences whose hidden states are compared layer by layer
    alone_sequences: int = 16  # sequences also scored each in a batch of its own (engine_batch, trainer_batch)

    def __post_init__(self):
        super().__post_init__()
        if self.lora is not None:
            raise ConfigError("diagnose does not take a LoRA adapter yet: scan it with mismatch scan --lora")
        if self.engine != "vllm":
            raise ConfigError(
                "diagnose needs --engine vllm: the hf engine's prefill is the trainer's own forward, so there is no engine side to isolate"
            )
        if self.sampling.temperature != 1.0 or self.sampling.top_p != 1.0:
            raise ConfigError(
                "diagnose measures at --temperature 1 and --top-p 1: vLLM scores given sequences (prefill) without sampling processors"
            )
        _at_least("--topk", self.topk)
        _at_least("--layer-sequences", self.layer_sequences)
        _at_least("--alone-sequences", self.alone_sequences)


@dataclass
class AnalyzeConfig:
    """What `analyze` reads and how: a user's dump, optionally rescored by `model` in `dtypes`."""

    paths: list[Path]
    out: Path
    model: str | None = None  # rescores the dump's tokens: needed when it carries only μ
    dtypes: list[str] = field(default_factory=lambda: ["bf16"])  # trainer dtypes of the rescoring
    temperature: float | None = None  # the sampling temperature; None: the dump's, else 1
    top_p: float = 1.0  # the sampling top-p, applied to the rescored π as the engine applied it to μ
    format: str | None = None  # a reader name; None: detected
    corrections: list[str] = field(default_factory=list)  # `--correction NAME=…` thresholds
    seed: int | None = None  # of the bootstrap intervals; None: the scan's own when the dump is a scan's, else 0
    trust_remote_code: bool = False

    def __post_init__(self):
        self.paths = [Path(p) for p in self.paths]
        self.dtypes = _dtypes(self.dtypes)
        _check_sampling(
            Sampling(temperature=1.0 if self.temperature is None else self.temperature, top_p=self.top_p)
        )  # None: the dump's
        if not self.paths:
            raise ConfigError("analyze needs at least one dump file or folder")
        with_thresholds(self.corrections)

    def to_json(self) -> dict:
        return _json(self)
