"""The `mismatch` command line: argument parsing and terminal output only."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mismatch.config import ScanConfig
from mismatch.engines import ENGINES, EngineError, Sampling, default_engine
from mismatch.gate import check_pairs, parse_condition
from mismatch.models import DEFAULT_MODEL, ModelError
from mismatch.precision import parse_dtypes
from mismatch.prompts import PromptError
from mismatch.report.content import RunFolderError, headroom_text
from mismatch.runs import OutputExists, default_run_dir, check_output_dir

app = typer.Typer(add_completion=False, no_args_is_help=False, help="Measure the training-inference mismatch of an LLM.")
console = Console() if sys.stdout.isatty() else Console(width=160)  # logs and CI: no 80-column wrap
errors = Console(stderr=True)


def fail(message: str) -> None:
    """A user mistake: one line on stderr, exit code 2."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """With no command, `mismatch` scans the embedded default model."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if ctx.invoked_subcommand is None:
        ctx.invoke(ctx.command.get_command(ctx, "scan"))


@app.command()
def scan(
    model: str = typer.Option(DEFAULT_MODEL, help="HF hub id, local HF folder, or builtin:smollm2-135m."),
    engine: Optional[str] = typer.Option(None, help="Inference engine: vllm (default where installed) or hf."),
    dtypes: str = typer.Option("bf16,fp16", help="Engine dtypes, comma-separated (bf16, fp16, fp32)."),
    pairs: str = typer.Option("default", help="default: each engine dtype vs itself and fp32; all: every engine x trainer dtype."),
    prompts: Optional[Path] = typer.Option(None, help="Prompt file: .jsonl (prompt or messages), .txt, .csv or .parquet (prompt column)."),
    num_prompts: Optional[int] = typer.Option(None, help="Number of prompts (built-in set: 64; a file: all)."),
    samples: int = typer.Option(1, help="Samples per prompt."),
    chat_template: bool = typer.Option(True, help="Apply the tokenizer's chat template when it has one."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (> 0)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold in (0, 1]; the trainer applies the same."),
    max_tokens: int = typer.Option(128, help="Maximum new tokens per response."),
    seed: int = typer.Option(0, help="Seed for prompts, sampling and bootstrap."),
    max_model_len: Optional[int] = typer.Option(None, help="vLLM max_model_len."),
    tensor_parallel_size: int = typer.Option(1, help="vLLM tensor_parallel_size."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="vLLM gpu_memory_utilization (default 0.85 on GPU; on CPU a share of RAM for the KV cache instead of the default fixed 1 GiB)."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the model folder / hub."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default reports/<model>-<timestamp>/)."),
    force: bool = typer.Option(False, help="Write into a non-empty output folder."),
    resume: bool = typer.Option(False, help="Continue an interrupted scan in --out from its saved engine outputs."),
    strict: bool = typer.Option(False, help="Fail on prompts that do not fit the context instead of skipping them."),
    fail_on: list[str] = typer.Option([], "--fail-on", help='CI gate, repeatable: "[ENGINE/TRAINER:]METRIC>VALUE" (>, >=, <, <=); default pairs: equal dtypes. Exit 1 when one holds.'),
) -> None:
    """Generate with the engine, rescore the same tokens with HF per dtype, and report the gap."""
    try:
        engine_dtypes = parse_dtypes(dtypes)
    except ValueError as exc:
        fail(str(exc))
    engine = pick_engine(engine)
    if pairs not in ("default", "all"):
        fail(f"--pairs must be 'default' or 'all', not {pairs!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        fail("--temperature must be > 0: RL samples at T > 0 and the mismatch is measured on sampled tokens")
    if not 0 < top_p <= 1:
        fail("--top-p must be in (0, 1]")
    for name, value in (("--max-tokens", max_tokens), ("--samples", samples), ("--num-prompts", num_prompts)):
        if value is not None and value < 1:
            fail(f"{name} must be at least 1")
    config = ScanConfig(
        model=model,
        engine=engine,
        dtypes=engine_dtypes,
        out=out or default_run_dir(model),
        sampling=Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed),
        all_pairs=pairs == "all",
        prompts=prompts,
        num_prompts=num_prompts,
        samples=samples,
        chat_template=chat_template,
        max_model_len=max_model_len,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        trust_remote_code=trust_remote_code,
        strict=strict,
        fail_on=list(fail_on),
    )
    if resume and out is None:
        fail("--resume needs the --out folder of the scan to continue")
    try:
        check_pairs([parse_condition(c) for c in fail_on], config.pairs())
    except ValueError as exc:
        fail(str(exc))
    from mismatch.scan import ResumeError, run_scan  # heavy imports after the arguments are known to be good

    try:
        if not resume:
            check_output_dir(config.out, force)
        with RichProgress() as progress:
            summary = run_scan(config, progress, resume=resume)
    except (ModelError, PromptError, OutputExists, EngineError, ResumeError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        errors.print(f"interrupted: {config.out} is marked incomplete; continue with the same command and --resume --out {config.out}")
        raise typer.Exit(130) from None
    console.print(pair_table_view(summary["pairs"]))
    if skipped := summary["skipped_prompts"]:
        errors.print(f"skipped {len(skipped)} prompt(s) that do not fit the context with --max-tokens {max_tokens} (--strict to fail instead)")
    if headroom := summary.get("fp16_headroom"):
        console.print(f"FP16 headroom: {headroom_text(headroom)}", highlight=False)
    console.print(f"[bold]Verdict:[/] {summary['recommendation']['summary']}", highlight=False)
    console.print(f"Run folder: {config.out} (report.html, summary.md, tokens.parquet, summary.json)")
    if failed := summary.get("gate", {}).get("failed"):
        for condition in failed:
            errors.print(f"[bold red]gate failed:[/] {condition}", highlight=False)
        raise typer.Exit(1)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A scan's run folder, or a train run folder.")) -> None:
    """Rebuild report.html (and summary.md for a scan) from a run folder's saved data."""
    from mismatch.report import write_report
    from mismatch.report.training import render_training, training_runs
    from mismatch.runs import write_text

    try:
        if runs := training_runs(run_dir):
            write_text(run_dir / "report.html", render_training(runs))
            console.print(f"wrote {run_dir / 'report.html'}")
            return
        for path in write_report(run_dir):
            console.print(f"wrote {path}")
    except RunFolderError as exc:
        fail(str(exc))


def pick_engine(engine: str | None) -> str:
    """The engine asked for, or vLLM where installed, else hf with a notice."""
    if engine is None:
        engine = default_engine()
        if engine == "hf":
            errors.print("notice: vLLM is not installed; using --engine hf (transformers generate)")
    if engine not in ENGINES:
        fail(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    return engine


class RichProgress:
    """One progress bar per stage (generation per engine dtype, rescoring per pair)."""

    def __enter__(self):
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def stage(self, description: str, total: int):
        task = self.bars.add_task(description, total=total)
        return lambda n: self.bars.advance(task, n)


def _fmt(value, spec: str = ".2e") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def pair_table_view(pairs: list[dict]) -> Table:
    table = Table(title="Training-inference mismatch, ℓ = log π(trainer) − log μ(engine)")
    for column in ("engine→trainer", "tokens", "k3", "k3 95% CI", "k1", "mean|Δp|", "max|Δp|", "max ratio", ">2×", "seq KL", "slope/1k"):
        table.add_column(column, justify="right", no_wrap=True)
    for p in pairs:
        table.add_row(
            f"{p['engine_dtype']}→{p['trainer_dtype']}",
            f"{p['n_tokens']}" + (f" +{p['n_nonfinite']} non-finite" if p["n_nonfinite"] else ""),
            _fmt(p["k3"]),
            f"{_fmt(p.get('k3_ci_low'), '.1e')}–{_fmt(p.get('k3_ci_high'), '.1e')}",
            _fmt(p["k1"], ".1e"),
            _fmt(p["mean_abs_dp"], ".1e"),
            _fmt(p["max_abs_dp"], ".3f"),
            _fmt(p["max_ratio"], ".3f"),
            _fmt(p["frac_outside_2"], ".3f"),
            _fmt(p["seq_kl"], ".1e"),
            _fmt(p["seq_slope_per_1k"], ".1e"),
        )
    return table


@app.command()
def compare(
    before: Path = typer.Argument(..., help="Run folder before the change."),
    after: Path = typer.Argument(..., help="Run folder after the change."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default reports/compare-<timestamp>/)."),
    force: bool = typer.Option(False, help="Write into a non-empty output folder."),
) -> None:
    """Before / after: both runs' metrics side by side with ratios, and both scatters (HTML + Markdown)."""
    from mismatch.compare import NotComparable
    from mismatch.report import write_compare

    try:
        target = check_output_dir(out or default_run_dir("compare"), force)
        for path in write_compare(before, after, target):
            console.print(f"wrote {path}")
    except (RunFolderError, NotComparable, OutputExists) as exc:
        fail(str(exc))


@app.command()
def train(
    model: str = typer.Option(DEFAULT_MODEL, help="HF hub id, local HF folder, or builtin:smollm2-135m."),
    engine: Optional[str] = typer.Option(None, help="Rollout engine: vllm (default where installed) or hf."),
    dtype: str = typer.Option("bf16", help="Precision of engine and policy compute (bf16, fp16, fp32)."),
    compare: Optional[str] = typer.Option(None, help="Run once per dtype (e.g. bf16,fp16) with the same seed and data, one report."),
    algo: str = typer.Option("grpo", help="Loss: grpo, gspo, token-tis, seq-mis, pg-seq-is."),
    steps: int = typer.Option(20, help="Optimiser steps."),
    prompts_per_step: int = typer.Option(8, help="Prompts per step."),
    group_size: int = typer.Option(8, help="Samples per prompt (GRPO group, ≥ 2)."),
    max_tokens: int = typer.Option(96, help="Maximum new tokens per rollout."),
    temperature: float = typer.Option(1.0, help="Rollout temperature (> 0)."),
    lr: float = typer.Option(2e-6, help="AdamW learning rate."),
    grad_clip: float = typer.Option(1.0, help="Gradient-norm clip."),
    seed: int = typer.Option(0, help="Seed for data order, sampling and initial state."),
    save_every: int = typer.Option(0, help="Also save an HF checkpoint every N steps (0: only at the end)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompt file whose rows carry an `answer` (default: built-in arithmetic)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default reports/train-<model>-<timestamp>/)."),
    force: bool = typer.Option(False, help="Write into a non-empty output folder."),
) -> None:
    """A minimal GRPO loop: vLLM rollouts, HF policy, weight sync every step; reward and mismatch per step."""
    from mismatch.train.losses import LOSSES

    try:
        dtypes = parse_dtypes(compare or dtype)
    except ValueError as exc:
        fail(str(exc))
    engine = pick_engine(engine)
    if algo not in LOSSES:
        fail(f"unknown --algo {algo!r}; use one of {', '.join(LOSSES)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        fail("--temperature must be > 0")
    for name, value, least in (("--steps", steps, 1), ("--prompts-per-step", prompts_per_step, 1), ("--group-size", group_size, 2), ("--max-tokens", max_tokens, 1)):
        if value < least:
            fail(f"{name} must be at least {least}")
    root = out or default_run_dir(f"train-{model}")
    from mismatch.report.training import render_training
    from mismatch.runs import write_text
    from mismatch.train.loop import TrainConfig, run_training

    try:
        check_output_dir(root, force)
        folders = {}
        for run_dtype in dtypes:
            folder = root / run_dtype if len(dtypes) > 1 else root
            config = TrainConfig(model=model, engine=engine, dtype=run_dtype, out=folder, steps=steps, prompts_per_step=prompts_per_step, group_size=group_size,
                                 max_tokens=max_tokens, temperature=temperature, lr=lr, grad_clip=grad_clip, algo=algo, seed=seed, save_every=save_every, prompts=prompts)
            summary = run_training(config, on_step=lambda row, d=run_dtype: console.print(step_line(d, row), highlight=False))
            folders[run_dtype] = folder
            if summary["interrupted"]:
                errors.print(f"interrupted after {summary['steps_done']} step(s); writing what there is")
                break
        write_text(root / "report.html", render_training(folders))
    except (ModelError, PromptError, OutputExists, EngineError) as exc:
        fail(str(exc))
    console.print(f"Run folder: {root} (report.html, metrics.csv, checkpoint-final/)")


def step_line(dtype: str, row: dict) -> str:
    skipped = " [red]skipped[/]" if row["skipped"] else ""
    return (
        f"{dtype} step {row['step']:>3}  reward {row['reward_mean']:.3f}  acc {row['accuracy']:.3f}  k3 {row['k3']:.2e}  "
        f"mean|Δp| {row['mean_abs_dp']:.2e}  ratio {row['min_ratio']:.3f}–{row['max_ratio']:.3f}  grad {row['grad_norm']:.3f}  "
        f"scale {row['loss_scale']:g}  entropy {row['entropy']:.2f}  len {row['response_len']:.0f}  {row['step_time']:.1f}s{skipped}"
    )
