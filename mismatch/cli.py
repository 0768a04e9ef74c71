"""The `mismatch` command line: each command builds a config, calls one library function and
prints. Checks live in the configs; a `MismatchError` becomes one line on stderr and exit 2 here."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mismatch import quiet  # first: it sets switches read when torch and tqdm load
from mismatch.config import AnalyzeConfig, DiagnoseConfig, ScanConfig, TrainConfig, pairs_mode
from mismatch.engines import default_engine
from mismatch.errors import ConfigError, MismatchError
from mismatch.model.loading import DEFAULT_MODEL
from mismatch.records import Sampling
from mismatch.report.content import headroom_text
from mismatch.report.terminal import diagnosis_table_view, pair_table_view, step_line
from mismatch.runs import default_run_dir

app = typer.Typer(
    add_completion=False, no_args_is_help=False, help="Measure the training-inference mismatch of an LLM."
)
console = Console() if sys.stdout.isatty() else Console(width=160)  # logs and CI: no 80-column wrap
errors = Console(stderr=True)

# Options shared by commands, declared once.
Model = Annotated[str, typer.Option(help="HF hub id, local HF folder, or builtin:smollm2-135m.")]
Engine = Annotated[str | None, typer.Option(help="Inference engine: vllm (default where installed) or hf.")]
PromptFile = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="Prompt file: .jsonl (prompt or messages, optional answer), .txt, .csv or .parquet (prompt column).",
    ),
]
Temperature = Annotated[float, typer.Option(help="Sampling temperature (> 0).")]
MaxTokens = Annotated[int, typer.Option(help="Maximum new tokens per response.")]
Seed = Annotated[int, typer.Option(help="Seed for prompts, data order, sampling and bootstrap.")]
Out = Annotated[Path | None, typer.Option(help="Output folder (default reports/<name>-<timestamp>/).")]
Dtypes = Annotated[str, typer.Option(help="Engine dtypes, comma-separated (bf16, fp16, fp32).")]
NumPrompts = Annotated[int | None, typer.Option(help="Number of prompts (built-in set: 64; a file: all).")]
Samples = Annotated[int, typer.Option(help="Samples per prompt.")]
ChatTemplate = Annotated[bool, typer.Option(help="Apply the tokenizer's chat template when it has one.")]
MaxModelLen = Annotated[int | None, typer.Option(help="vLLM max_model_len.")]
MemoryShare = Annotated[
    float | None,
    typer.Option(
        help="vLLM gpu_memory_utilization (default 0.85 on GPU; on CPU a share of RAM for the KV cache instead of the default fixed 1 GiB)."
    ),
]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow model code from the model folder / hub.")]
Force = Annotated[bool, typer.Option(help="Write into a non-empty output folder.")]


def command(function):
    """Register a command whose user-facing errors end as one line on stderr and exit code 2."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except MismatchError as exc:
            errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return app.command(function.__name__)(run)


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, `mismatch` scans the embedded default model."""
    quiet.libraries()
    if ctx.invoked_subcommand is None:
        ctx.invoke(ctx.command.get_command(ctx, "scan"))


@command
def scan(
    model: Model = DEFAULT_MODEL,
    engine: Engine = None,
    dtypes: Dtypes = "bf16,fp16",
    pairs: Annotated[
        str, typer.Option(help="default: each engine dtype vs itself and fp32; all: every engine x trainer dtype.")
    ] = "default",
    prompts: PromptFile = None,
    num_prompts: NumPrompts = None,
    samples: Samples = 1,
    chat_template: ChatTemplate = True,
    temperature: Temperature = 1.0,
    top_p: Annotated[
        float, typer.Option(help="Nucleus sampling threshold in (0, 1]; the trainer applies the same.")
    ] = 1.0,
    max_tokens: MaxTokens = 128,
    seed: Seed = 0,
    max_model_len: MaxModelLen = None,
    tensor_parallel_size: Annotated[
        int, typer.Option(help="vLLM tensor_parallel_size (GPUs the engine shards over).")
    ] = 1,
    pipeline_parallel_size: Annotated[
        int, typer.Option(help="vLLM pipeline_parallel_size (past one node: vLLM's Ray backend, see docs/scale.md).")
    ] = 1,
    gpu_memory_utilization: MemoryShare = None,
    trust_remote_code: TrustRemoteCode = False,
    out: Out = None,
    force: Force = False,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted scan in --out from its saved engine outputs.")
    ] = False,
    strict: Annotated[
        bool, typer.Option(help="Fail on prompts that do not fit the context instead of skipping them.")
    ] = False,
    semantic_probe: Annotated[
        int,
        typer.Option(
            help="Prompts the engine also generates in FP32, scored by the FP32 trainer: a gap there is an implementation difference, not precision (0: skip)."
        ),
    ] = 4,
    reference: Annotated[
        str,
        typer.Option(
            help="The FP32 trainer reference: all sequences, none (skip it: a 70B FP32 copy does not fit), or the first N per engine dtype; its memory is shown when it starts."
        ),
    ] = "all",
    fail_on: Annotated[
        list[str],
        typer.Option(
            "--fail-on",
            help='CI gate, repeatable: "[ENGINE/TRAINER:]METRIC>VALUE" (>, >=, <, <=); default pairs: equal dtypes. Exit 1 when one holds.',
        ),
    ] = [],  # noqa: B006 (typer reads it)
    lora: Annotated[
        Path | None,
        typer.Option(
            help="A PEFT LoRA adapter folder: the engine applies it as a LoRA request, the trainer through PEFT; the base with it merged in is scanned too, for comparison."
        ),
    ] = None,
) -> None:
    """Generate with the engine, rescore the same tokens with HF per dtype, and report the gap."""
    if resume and out is None:
        raise ConfigError("--resume needs the --out folder of the scan to continue")
    config = ScanConfig(
        model=model,
        engine=pick_engine(engine),
        dtypes=dtypes,
        out=out or default_run_dir(model),
        sampling=Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed),
        all_pairs=pairs_mode(pairs),
        prompts=prompts,
        num_prompts=num_prompts,
        samples=samples,
        chat_template=chat_template,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        trust_remote_code=trust_remote_code,
        strict=strict,
        semantic_probe=semantic_probe,
        reference=reference,
        fail_on=list(fail_on),
        lora=lora,
    )
    from mismatch.commands.scan import run_scan  # heavy imports after the arguments are known to be good

    try:
        with RichProgress() as progress:
            summary = run_scan(config, progress, resume=resume, force=force)
    except KeyboardInterrupt:
        errors.print(
            f"interrupted: {config.out} is marked incomplete; continue with the same command and --resume --out {config.out}"
        )
        raise typer.Exit(130) from None
    console.print(pair_table_view(summary["pairs"]))
    if skipped := summary["skipped_prompts"]:
        errors.print(
            f"skipped {len(skipped)} prompt(s) that do not fit the context with --max-tokens {max_tokens} (--strict to fail instead)"
        )
    for dtype, reason in summary["refused_dtypes"].items():
        errors.print(
            f"notice: {config.engine} refuses {dtype} for this model ({reason}); {dtype} was measured on the trainer side only",
            highlight=False,
            soft_wrap=True,
        )
    if headroom := summary.get("fp16_headroom"):
        console.print(f"FP16 headroom: {headroom_text(headroom)}", highlight=False)
    console.print(f"[bold]Verdict:[/] {summary['recommendation']['summary']}", highlight=False)
    console.print(f"Run folder: {config.out} (report.html, summary.md, tokens.parquet, summary.json)")
    for condition in summary.get("gate", {}).get("not_measured", []):
        errors.print(f"notice: {condition}", highlight=False, soft_wrap=True)
    if failed := summary.get("gate", {}).get("failed"):
        for condition in failed:
            errors.print(f"[bold red]gate failed:[/] {condition}", highlight=False)
        raise typer.Exit(1)


@command
def diagnose(
    model: Model = DEFAULT_MODEL,
    dtypes: Dtypes = "bf16,fp16",
    prompts: PromptFile = None,
    num_prompts: NumPrompts = None,
    samples: Samples = 1,
    chat_template: ChatTemplate = True,
    max_tokens: MaxTokens = 128,
    seed: Seed = 0,
    max_model_len: MaxModelLen = None,
    gpu_memory_utilization: MemoryShare = None,
    trust_remote_code: TrustRemoteCode = False,
    from_run: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Reuse the rollouts of this scan run folder (its model, prompts and sampling) instead of generating.",
        ),
    ] = None,
    topk: Annotated[
        int, typer.Option(help="The engine's top-k log-probs compared with the trainer's distribution.")
    ] = 20,
    layer_sequences: Annotated[
        int, typer.Option(help="Sequences whose hidden states are compared with FP32 layer by layer.")
    ] = 8,
    alone_sequences: Annotated[
        int, typer.Option(help="Sequences also scored each on its own, by engine and trainer (the batch components).")
    ] = 16,
    out: Out = None,
    force: Force = False,
) -> None:
    """Where the gap comes from: semantic, engine decode path and batching, trainer batching, precision per side, per layer."""
    settings = dict(
        model=model,
        dtypes=dtypes,
        prompts=prompts,
        num_prompts=num_prompts,
        samples=samples,
        chat_template=chat_template,
        max_tokens=max_tokens,
        seed=seed,
    )
    if from_run:  # the scan's own settings, so that the rollouts are what they claim to be
        from mismatch.runs import read_summary

        scanned = read_summary(from_run, ("scan",))["config"]
        settings = {k: scanned[k] for k in ("model", "dtypes", "num_prompts", "samples", "chat_template")} | {
            k: scanned["sampling"][k] for k in ("max_tokens", "seed")
        }
        settings["prompts"] = scanned["prompts"] and Path(scanned["prompts"])
    config = DiagnoseConfig(
        engine="vllm",
        out=out or default_run_dir(settings["model"], "diagnose"),
        sampling=Sampling(max_tokens=settings.pop("max_tokens"), seed=settings.pop("seed")),
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        trust_remote_code=trust_remote_code,
        semantic_probe=0,  # diagnose measures the semantic component on every sequence
        from_run=from_run,
        topk=topk,
        layer_sequences=layer_sequences,
        alone_sequences=alone_sequences,
        **settings,
    )
    from mismatch.commands.diagnose import run_diagnose

    with RichProgress() as progress:
        summary = run_diagnose(config, progress, force=force)
    console.print(diagnosis_table_view(summary["diagnosis"]["components"]))
    console.print(f"[bold]Verdict:[/] {summary['recommendation']['summary']}", highlight=False)
    console.print(f"Run folder: {config.out} (report.html, summary.md, tokens.parquet, topk.parquet, summary.json)")


@command
def analyze(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="The dump: open-format .parquet/.jsonl files or folders, a prime-rl token_exports folder, slime rollout .pt files.",
            show_default=False,
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            help="Also (or, for a dump of μ only, instead) compute π by rescoring the dump's tokens with this model: HF hub id, local folder or builtin:smollm2-135m."
        ),
    ] = None,
    dtypes: Annotated[str, typer.Option(help="Trainer dtypes of the --model rescoring, comma-separated.")] = "bf16",
    temperature: Annotated[
        float | None,
        typer.Option(
            help="The sampling temperature (default: the dump's, else 1); the rescoring divides logits by it."
        ),
    ] = None,
    top_p: Annotated[float, typer.Option(help="The sampling top-p; the rescoring applies the same nucleus.")] = 1.0,
    dump_format: Annotated[
        str | None, typer.Option("--format", help="open, prime-rl or slime (default: detected).")
    ] = None,
    correction: Annotated[
        list[str],
        typer.Option(
            "--correction",
            help="A correction's threshold, repeatable: NAME=HIGH or NAME=LOW,HIGH (token_tis, icepop, seq_mis, geometric, trl_*; trl=… sets TRL's four).",
        ),
    ] = [],  # noqa: B006 (typer reads it)
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the bootstrap intervals (default: a scan's own when its tokens are analysed, else 0)."
        ),
    ] = None,
    trust_remote_code: TrustRemoteCode = False,
    out: Out = None,
    force: Force = False,
) -> None:
    """The mismatch of your own RL run, read from its dumps: per pair and per step, health in each framework's terms, a setup audit, and what each correction would do."""
    config = AnalyzeConfig(
        paths=paths,
        out=out or default_run_dir(paths[0].resolve().name, "analyze"),
        model=model,
        dtypes=dtypes,
        temperature=temperature,
        top_p=top_p,
        format=dump_format,
        corrections=list(correction),
        seed=seed,
        trust_remote_code=trust_remote_code,
    )
    from mismatch.commands.analyze import run_analyze

    with RichProgress() as progress:
        summary = run_analyze(config, progress, force=force)
    console.print(pair_table_view(summary["pairs"]))
    for a in summary["audit"]:
        if a["status"] in ("warn", "fail"):
            errors.print(
                f"audit {a['status']}: {a['check']} ({a['pair']}): {a['detail']}", highlight=False, soft_wrap=True
            )
    console.print(f"[bold]Verdict:[/] {summary['recommendation']['summary']}", highlight=False)
    console.print(
        f"Run folder: {config.out} (report.html, summary.md, tokens.parquet, metrics.csv{', steps.parquet' if summary['n_steps'] > 1 else ''}, summary.json)"
    )


@command
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder: scan, diagnose, train or compare.")]) -> None:
    """Rebuild a run folder's report (report.html; summary.md for a scan or a diagnose) from its saved data."""
    from mismatch.report import write_report

    for path in write_report(run_dir):
        console.print(f"wrote {path}")


@command
def compare(
    before: Annotated[Path, typer.Argument(help="Run folder before the change.")],
    after: Annotated[Path, typer.Argument(help="Run folder after the change.")],
    out: Out = None,
    force: Force = False,
) -> None:
    """Before / after: both runs' metrics side by side with ratios, and both scatters (HTML + Markdown)."""
    from mismatch.report import write_compare

    for path in write_compare(before, after, out or default_run_dir("compare"), force):
        console.print(f"wrote {path}")


@command
def train(
    model: Model = DEFAULT_MODEL,
    engine: Engine = None,
    dtype: Annotated[str, typer.Option(help="Precision of engine and policy compute (bf16, fp16, fp32).")] = "bf16",
    compare: Annotated[
        str | None, typer.Option(help="Run once per dtype (e.g. bf16,fp16) with the same seed and data, one report.")
    ] = None,
    algo: Annotated[str, typer.Option(help="Loss: grpo, gspo, token-tis, seq-mis, pg-seq-is.")] = "grpo",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 20,
    prompts_per_step: Annotated[int, typer.Option(help="Prompts per step.")] = 8,
    group_size: Annotated[int, typer.Option(help="Samples per prompt (GRPO group, ≥ 2).")] = 8,
    max_tokens: MaxTokens = 96,
    temperature: Temperature = 1.0,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-6,
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip.")] = 1.0,
    seed: Seed = 0,
    save_every: Annotated[int, typer.Option(help="Also save an HF checkpoint every N steps (0: only at the end).")] = 0,
    prompts: PromptFile = None,
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(help="vLLM's share of the GPU (default: 90% of what the loaded policy leaves free)."),
    ] = None,
    max_model_len: MaxModelLen = None,
    sleep: Annotated[
        bool | None,
        typer.Option(
            "--sleep/--no-sleep",
            help="vLLM sleep mode: the engine gives its memory back during the learner step (default: on GPU).",
        ),
    ] = None,
    lora_rank: Annotated[
        int,
        typer.Option(
            help="Train a PEFT LoRA of this rank on the frozen base (FP32 adapter masters, compute in --dtype; the engine serves it as a LoRA request); 0: full fine-tuning."
        ),
    ] = 0,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: 2 × rank).")] = None,
    lora_target_modules: Annotated[
        str, typer.Option(help="Comma-separated module names the LoRA adapts, or all-linear.")
    ] = "all-linear",
    out: Out = None,
    force: Force = False,
) -> None:
    """A minimal GRPO loop: vLLM rollouts, HF policy, weight sync every step; reward and mismatch per step."""
    config = TrainConfig(
        model=model,
        engine=pick_engine(engine),
        dtypes=compare or dtype,
        out=out or default_run_dir(model, "train"),
        steps=steps,
        prompts_per_step=prompts_per_step,
        group_size=group_size,
        max_tokens=max_tokens,
        temperature=temperature,
        lr=lr,
        grad_clip=grad_clip,
        algo=algo,
        seed=seed,
        save_every=save_every,
        prompts=prompts,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        sleep=sleep,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_target_modules=lora_target_modules,
    )
    from mismatch.commands.train import run_training

    summaries = run_training(
        config, on_step=lambda dtype, row: console.print(step_line(dtype, row), highlight=False), force=force
    )
    if summaries[-1]["interrupted"]:
        errors.print(f"interrupted after {summaries[-1]['steps_done']} step(s); writing what there is")
    console.print(f"Run folder: {config.out} (report.html, metrics.csv, checkpoint-final/)")


def pick_engine(engine: str | None) -> str:
    """The engine asked for, or vLLM where installed, else hf with a notice."""
    if engine is None:
        engine = default_engine()
        if engine == "hf":
            errors.print("notice: vLLM is not installed; using --engine hf (transformers generate)")
    return engine


class RichProgress:
    """One progress bar per stage (generation per engine dtype, rescoring per pair)."""

    def __enter__(self):
        self.bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def stage(self, description: str, total: int):
        task = self.bars.add_task(description, total=total)
        return lambda n: self.bars.advance(task, n)
