"""Settings of each command as plain values, checked on construction.

A library caller (the bench, a notebook) gets the same one-line `ConfigError` the CLI prints, so
no range check lives in the CLI. Lists may be given as comma-separated text ("bf16,fp16").

A field that is also a command-line option carries its `Option` (help text and `--help` panel):
`mismatch.cli` derives the option, its type and its default from the field, so each is written once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, Field, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mismatch.engines import ENGINES
from mismatch.engines.base import DISTRIBUTION_ROWS, RowPlan, plan_rows, row_budget
from mismatch.errors import ConfigError
from mismatch.model.lora import read_adapter, vllm_max_rank
from mismatch.records import DTYPE_NAMES, DUMP_SIDES, Sampling, parse_dtypes
from mismatch.stats.corrections import with_thresholds
from mismatch.verdict.gate import Condition, check_pairs, parse_condition

REFERENCE_DTYPE = "fp32"
DEFAULT_NUM_PROMPTS = 64  # for a built-in set; a prompt file is used whole
SANITY_SET = "builtin:sanity"  # mismatch.inputs.prompts.BUILTIN_SETS: problems the embedded model solves 20–80%
ARITHMETIC_SET = "builtin:arithmetic"  # of the time; arithmetic it solves ~4% of the time
PAIR_MODES = ("default", "all")
ALGOS = ("grpo", "gspo", "token-tis", "seq-mis", "pg-seq-is")  # mismatch.learner.losses.LOSSES


class Panel:
    """The panels of `--help`, in the order they are shown."""

    INPUT = "Input"
    MODEL = "Model"
    PROMPTS = "Prompts"
    SAMPLING = "Sampling"
    TRAINING = "Training"
    ENGINE = "Engine"
    REFERENCE = "Reference / pairs"
    COMPONENTS = "Components"
    RESCORING = "Rescoring"
    CORRECTIONS = "Corrections"
    LORA = "LoRA"
    OUTPUT = "Output"
    GATE = "CI gate"
    IMPACT = "Gradient impact"


PANELS = tuple(title for name, title in vars(Panel).items() if name.isupper())


@dataclass(frozen=True)
class Option:
    """How a config field is given on the command line."""

    help: str
    panel: str
    flags: tuple[str, ...] = ()  # when not --field-name, e.g. ("--from",) or ("--sleep/--no-sleep",)
    text: Callable[[str], list[str]] | None = None  # a list given as comma-separated text, parsed by this


def option(default: Any, declared: Option) -> Any:
    """A config field that is also an option; a list default is copied for each config."""
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata={"option": declared})
    return field(default=default, metadata={"option": declared})


def declared_option(config_field: Field[Any]) -> Option | None:
    """The `Option` a config field declares, if any."""
    return config_field.metadata.get("option")


def field_default(config_field: Field[Any]) -> Any:
    if config_field.default_factory is MISSING:
        return config_field.default
    return config_field.default_factory()


def names(text: str) -> list[str]:
    """`"q_proj, v_proj"` -> `["q_proj", "v_proj"]`."""
    return [name.strip() for name in text.split(",") if name.strip()]


# Options that more than one config declares.
PROMPT_FILE = Option(
    f"A built-in set ({SANITY_SET}, {ARITHMETIC_SET}) or a prompt file: .jsonl (prompt or messages, optional"
    " answer), .txt, .csv or .parquet (prompt column).",
    Panel.PROMPTS,
)
TEMPERATURE = Option("Sampling temperature (> 0).", Panel.SAMPLING)
MAX_TOKENS = Option("Maximum new tokens per response.", Panel.SAMPLING)
SEED = Option("Seed for prompts, data order, sampling and bootstrap.", Panel.SAMPLING)
MAX_MODEL_LEN = Option("vLLM max_model_len.", Panel.ENGINE)
ENFORCE_EAGER = Option(
    "vLLM enforce_eager: eager PyTorch instead of compiled graphs (torch.compile, CUDA graphs). Default: compiled on"
    " a GPU (vLLM's default, what an RL rollout runs), eager on CPU.",
    Panel.ENGINE,
    flags=("--enforce-eager/--no-enforce-eager",),
)
TRUST_REMOTE_CODE = Option("Allow model code from the model folder / hub.", Panel.MODEL)


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
    prompts: Path | None = option(None, PROMPT_FILE)
    num_prompts: int | None = option(
        None, Option(f"Number of prompts (built-in set: {DEFAULT_NUM_PROMPTS}; a file: all).", Panel.PROMPTS)
    )
    samples: int = option(1, Option("Samples per prompt.", Panel.PROMPTS))
    chat_template: bool = option(True, Option("Apply the tokenizer's chat template when it has one.", Panel.PROMPTS))
    max_model_len: int | None = option(None, MAX_MODEL_LEN)
    tensor_parallel_size: int = option(
        1, Option("vLLM tensor_parallel_size (GPUs the engine shards over).", Panel.ENGINE)
    )
    pipeline_parallel_size: int = option(
        1, Option("vLLM pipeline_parallel_size (past one node: vLLM's Ray backend, see docs/scale.md).", Panel.ENGINE)
    )
    gpu_memory_utilization: float | None = option(
        None,
        Option(
            "vLLM gpu_memory_utilization (default 0.85 on GPU; on CPU a share of RAM for the KV cache instead of the"
            " default fixed 1 GiB).",
            Panel.ENGINE,
        ),
    )
    enforce_eager: bool | None = option(None, ENFORCE_EAGER)  # None: engines.vllm_support.enforce_eager decides
    trust_remote_code: bool = option(False, TRUST_REMOTE_CODE)
    fail_on: list[str] = option(  # the conditions of mismatch.verdict.gate
        [],
        Option(
            'CI gate, repeatable: "[ENGINE/TRAINER:]METRIC>VALUE" (>, >=, <, <=); default pairs: equal dtypes.'
            " Exit 1 when one holds.",
            Panel.GATE,
        ),
    )
    strict: bool = option(
        False, Option("Fail on prompts that do not fit the context instead of skipping them.", Panel.PROMPTS)
    )
    semantic_probe: int = option(
        4,
        Option(
            "Prompts the engine also generates in FP32, scored by the FP32 trainer: a gap there is an implementation"
            " difference, not precision (0: skip).",
            Panel.REFERENCE,
        ),
    )
    reference: str = option(
        "all",
        Option(
            "The FP32 trainer reference: all sequences, none (skip it: a 70B FP32 copy does not fit), or the first N"
            " per engine dtype; its memory is shown when it starts.",
            Panel.REFERENCE,
        ),
    )
    lora: Path | None = option(
        None,
        Option(
            "A PEFT LoRA adapter folder: the engine applies it as a LoRA request, the trainer through PEFT; the base"
            " with it merged in is scanned too, for comparison.",
            Panel.LORA,
        ),
    )
    impact: bool | None = option(
        None,
        Option(
            "Measure the gradient's bias from the mismatch against its sampling noise, per engine dtype (default: on"
            " when every prompt has an answer and --samples ≥ 2).",
            Panel.IMPACT,
            flags=("--impact/--no-impact",),
        ),
    )
    train_batch: int | None = option(
        None,
        Option(
            "Your trainer's sequences per step: the verdict compares the bias with one step's noise at this batch"
            " (default: the scan's).",
            Panel.IMPACT,
        ),
    )
    full_distribution: bool = option(
        False,
        Option(
            "Record the engine's whole distribution at --distribution-rows sampled positions and compare it with the"
            " trainer's: exact KL[μ‖π], KL[π‖μ] and total variation per pair.",
            Panel.REFERENCE,
            flags=("--full-distribution/--no-full-distribution",),
        ),
    )
    distribution_rows: int = option(
        DISTRIBUTION_ROWS,
        Option(
            "Positions per engine dtype whose whole distribution is recorded, drawn by seed before generating; each"
            " holds the vocabulary in FP32 (256 × 49k tokens ≈ 50 MB), at most 100 MB per engine dtype.",
            Panel.REFERENCE,
        ),
    )

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
        _at_least("--train-batch", self.train_batch)
        _at_least("--distribution-rows", self.distribution_rows)
        if self.impact and self.samples < 2:
            raise ConfigError(
                "--impact needs --samples 2 or more: the advantages are normalised within each prompt's samples"
            )
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
            "enforce_eager": self.enforce_eager,
        }

    def distribution_plan(self, requests: int, vocab: int) -> RowPlan | None:
        """The (request, response position) pairs whose whole distribution each engine dtype records, drawn by
        the seed for `requests` requests; None with --no-full-distribution."""
        if not self.full_distribution:
            return None
        rows = row_budget(self.distribution_rows, vocab)
        return plan_rows(requests, self.sampling.max_tokens, rows, seed=self.sampling.seed)

    def prompt_set(self) -> Path | str:
        """--prompts, else a built-in set: the sanity problems when each prompt has a group of samples to reward
        (--samples ≥ 2, where the gradient impact is measured), else the arithmetic one (the scan as before)."""
        if self.prompts is not None:
            return self.prompts
        return SANITY_SET if self.samples >= 2 else ARITHMETIC_SET

    def to_json(self) -> dict:
        return _json(self) | {"pairs": [list(p) for p in self.pairs()], "prompts": str(self.prompt_set())}


@dataclass
class TrainConfig:
    model: str
    engine: str
    dtypes: list[str]  # one run per dtype, same seed and data order (`--compare`)
    out: Path  # the run folder; with several dtypes, the root of one folder per dtype
    steps: int = option(20, Option("Optimiser steps.", Panel.TRAINING))
    prompts_per_step: int = option(8, Option("Prompts per step.", Panel.TRAINING))
    group_size: int = option(8, Option("Samples per prompt (GRPO group, ≥ 2).", Panel.TRAINING))
    max_tokens: int = option(96, MAX_TOKENS)
    temperature: float = option(1.0, TEMPERATURE)
    lr: float = option(2e-6, Option("AdamW learning rate.", Panel.TRAINING))
    grad_clip: float = option(1.0, Option("Gradient-norm clip.", Panel.TRAINING))
    algo: str = option("grpo", Option(f"Loss: {', '.join(ALGOS)}.", Panel.TRAINING))
    seed: int = option(0, SEED)
    seeds: int = option(
        1,
        Option(
            "Runs per dtype, seeded --seed … --seed+N−1; each seed pairs the dtypes (same data order and sampling)."
            " N ≥ 2: the final window's differences get t-intervals.",
            Panel.TRAINING,
        ),
    )
    impact_every: int = option(
        10,
        Option(
            "Measure the gradient impact of the mismatch (bias, noise, B*) at step 0 and every N steps, before the"
            " update (0: never).",
            Panel.TRAINING,
        ),
    )
    step0_check: bool = option(
        True,
        Option(
            "Scan step 0's prompts (an independent sample, first seed, each dtype) and check its k3 agrees with"
            " train's step-0 k3.",
            Panel.TRAINING,
            flags=("--step0-check/--no-step0-check",),
        ),
    )
    save_every: int = option(0, Option("Also save an HF checkpoint every N steps (0: only at the end).", Panel.OUTPUT))
    prompts: Path | None = option(None, PROMPT_FILE)
    num_prompts: int = 256
    gpu_memory_utilization: float | None = option(
        None, Option("vLLM's share of the GPU (default: 90% of what the loaded policy leaves free).", Panel.ENGINE)
    )
    max_model_len: int | None = option(None, MAX_MODEL_LEN)
    enforce_eager: bool | None = option(None, ENFORCE_EAGER)
    sleep: bool | None = option(
        None,
        Option(
            "vLLM sleep mode: the engine gives its memory back during the learner step (default: on GPU).",
            Panel.ENGINE,
            flags=("--sleep/--no-sleep",),
        ),
    )
    lora_rank: int = option(
        0,
        Option(
            "Train a PEFT LoRA of this rank on the frozen base (FP32 adapter masters, compute in --dtype; the engine"
            " serves it as a LoRA request); 0: full fine-tuning.",
            Panel.LORA,
        ),
    )
    lora_alpha: float | None = option(None, Option("LoRA alpha (default: 2 × rank).", Panel.LORA))
    lora_target_modules: list[str] = option(  # PEFT's names; all-linear: every linear layer but the head
        ["all-linear"], Option("Comma-separated module names the LoRA adapts, or all-linear.", Panel.LORA, text=names)
    )

    def __post_init__(self):
        self.dtypes = _dtypes(self.dtypes)
        _check_engine(self.engine)
        _at_least("--lora-rank", self.lora_rank, 0)
        vllm_max_rank(self.lora_rank, f"--lora-rank {self.lora_rank}")
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = names(self.lora_target_modules)
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
        _at_least("--seeds", self.seeds)
        _at_least("--impact-every", self.impact_every, 0)

    def seed_list(self) -> list[int]:
        """The seeds of the runs: --seed, --seed + 1, … (--seeds of them)."""
        return list(range(self.seed, self.seed + self.seeds))

    def prompt_set(self) -> Path | str:
        """--prompts, else the built-in sanity set: problems the embedded model solves 20–80% of the time, so
        that most groups carry a reward signal (it solves the arithmetic set ~4% of the time)."""
        return SANITY_SET if self.prompts is None else self.prompts

    def to_json(self, dtype: str) -> dict:
        """The settings of the run in `dtype` (what its summary.json records)."""
        return _json(self) | {"dtype": dtype, "prompts": str(self.prompt_set())}


@dataclass
class DiagnoseConfig(ScanConfig):
    """A scan's settings, plus where its rollouts come from and how much to look at.

    The engine scores given sequences only in prefill, where vLLM applies no sampling processor
    (its prompt log-probs are raw), so every component is measured at temperature 1 and top-p 1.
    """

    from_run: Path | None = option(
        None,
        Option(
            "Reuse the rollouts of this scan run folder (its model, prompts and sampling) instead of generating.",
            Panel.PROMPTS,
            flags=("--from",),
        ),
    )
    topk: int = option(
        20, Option("The engine's top-k log-probs compared with the trainer's distribution.", Panel.COMPONENTS)
    )
    layer_sequences: int = option(
        8, Option("Sequences whose hidden states are compared with FP32 layer by layer.", Panel.COMPONENTS)
    )
    alone_sequences: int = option(  # scored each in a batch of its own: engine_batch, trainer_batch
        16,
        Option(
            "Sequences also scored each on its own, by engine and trainer (the batch components).", Panel.COMPONENTS
        ),
    )
    full_distribution: bool = option(
        True,
        Option(
            "Record the engine's whole distribution at --distribution-rows sampled positions and compare it with the"
            " trainer's in the same dtype: exact KL[μ‖π], KL[π‖μ] and total variation.",
            Panel.COMPONENTS,
            flags=("--full-distribution/--no-full-distribution",),
        ),
    )

    def __post_init__(self):
        super().__post_init__()
        if self.lora is not None:
            raise ConfigError("diagnose does not take a LoRA adapter yet: scan it with mismatch scan --lora")
        if self.engine != "vllm":
            raise ConfigError(
                "diagnose needs --engine vllm: the hf engine's prefill is the trainer's own forward, so there is no"
                " engine side to isolate"
            )
        if self.sampling.temperature != 1.0 or self.sampling.top_p != 1.0:
            raise ConfigError(
                "diagnose measures at --temperature 1 and --top-p 1: vLLM scores given sequences (prefill) without"
                " sampling processors"
            )
        _at_least("--topk", self.topk)
        _at_least("--layer-sequences", self.layer_sequences)
        _at_least("--alone-sequences", self.alone_sequences)

    def prompt_set(self) -> Path | str:
        """As scan's; but a scan that recorded no prompt set (`--from`) ran before the sanity set: arithmetic."""
        if self.prompts is None and self.from_run is not None:
            return ARITHMETIC_SET
        return super().prompt_set()


@dataclass
class AnalyzeConfig:
    """What `analyze` reads and how: a user's dump, optionally rescored by `model` in `dtypes`."""

    paths: list[Path]
    out: Path
    model: str | None = option(  # needed when the dump carries only μ
        None,
        Option(
            "Also (or, for a dump of μ only, instead) compute π by rescoring the dump's tokens with this model: HF hub"
            " id, local folder or builtin:smollm2-135m.",
            Panel.RESCORING,
        ),
    )
    dtypes: list[str] = option(
        ["bf16"],
        Option("Trainer dtypes of the --model rescoring, comma-separated.", Panel.RESCORING, text=parse_dtypes),
    )
    temperature: float | None = option(
        None,
        Option(
            "The sampling temperature (default: the dump's, else 1); the rescoring divides logits by it.",
            Panel.RESCORING,
        ),
    )
    top_p: float = option(  # applied to the rescored π as the engine applied it to μ
        1.0, Option("The sampling top-p; the rescoring applies the same nucleus.", Panel.RESCORING)
    )
    format: str | None = option(
        None, Option("open, prime-rl or slime (default: detected).", Panel.INPUT, flags=("--format",))
    )  # a reader name
    corrections: list[str] = option(
        [],
        Option(
            "A correction's threshold, repeatable: NAME=HIGH or NAME=LOW,HIGH (token_tis, icepop, seq_mis, geometric,"
            " trl_*; trl=… sets TRL's four).",
            Panel.CORRECTIONS,
            flags=("--correction",),
        ),
    )
    seed: int | None = option(
        None,
        Option(
            "Seed of the bootstrap intervals (default: a scan's own when its tokens are analysed, else 0).",
            Panel.OUTPUT,
        ),
    )
    trust_remote_code: bool = option(False, replace(TRUST_REMOTE_CODE, panel=Panel.RESCORING))
    fail_on: list[str] = option(  # the conditions of mismatch.verdict.gate, on every pair by default
        [],
        Option(
            'CI gate, repeatable: "[ENGINE/TRAINER:]METRIC>VALUE" (>, >=, <, <=); default: every pair (engine/trainer,'
            " engine/DTYPE with --model). Exit 1 when one holds.",
            Panel.GATE,
        ),
    )

    def __post_init__(self):
        self.paths = [Path(p) for p in self.paths]
        self.dtypes = _dtypes(self.dtypes)
        _check_sampling(
            Sampling(temperature=1.0 if self.temperature is None else self.temperature, top_p=self.top_p)
        )  # None: the dump's
        if not self.paths:
            raise ConfigError("analyze needs at least one dump file or folder")
        with_thresholds(self.corrections)
        self.conditions()

    def conditions(self) -> list[Condition]:
        """The parsed `--fail-on` gate: a pair's sides are the dump's engine and trainer and the dtypes."""
        return [parse_condition(text, (*DUMP_SIDES, *DTYPE_NAMES)) for text in self.fail_on]

    def to_json(self) -> dict:
        return _json(self)
