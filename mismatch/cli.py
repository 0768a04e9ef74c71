"""The `mismatch` command line: each command builds a config, calls one library function and
prints. Checks live in the configs; a `MismatchError` becomes one line on stderr and exit 2 here.

Each option is declared once. An option that goes into a config as it is is a field of that config
with its `Option` (mismatch.config): `command(Config)` adds it to the command's signature, with the
field's type and default, and hands it to the function in `**options`. The parameters a command
function names itself are the options the CLI turns into something else (a default run folder, the
engine where installed, a parsed dtype list) or keeps (--force, --resume).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import signal
import sys
import typing
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mismatch import DISTRIBUTION, quiet  # quiet first: it sets switches read when torch and tqdm load
from mismatch.config import (
    MAX_TOKENS,
    PANELS,
    SEED,
    TEMPERATURE,
    AnalyzeConfig,
    DiagnoseConfig,
    Option,
    Panel,
    ScanConfig,
    TrainConfig,
    declared_option,
    field_default,
    pairs_mode,
)
from mismatch.engines import default_engine
from mismatch.engines.vllm_support import vllm_range_notice
from mismatch.errors import ConfigError, EngineDied, MismatchError
from mismatch.model.loading import DEFAULT_MODEL
from mismatch.records import Sampling, parse_dtypes
from mismatch.report.content import distribution_view, headroom_text
from mismatch.report.terminal import diagnosis_table_view, pair_table_view, step_line
from mismatch.runs import default_run_dir
from mismatch.stats.growth import growth_sentence

app = typer.Typer(
    add_completion=False, no_args_is_help=False, help="Measure the training-inference mismatch of an LLM."
)
console = Console() if sys.stdout.isatty() else Console(width=160)  # logs and CI: no 80-column wrap
errors = Console(stderr=True)


def typer_option(declared: Option) -> Any:
    return typer.Option(*declared.flags, help=declared.help, rich_help_panel=declared.panel)


# The options the commands take themselves (not as a config field), each declared once.
Model = Annotated[
    str, typer.Option(help="HF hub id, local HF folder, or builtin:smollm2-135m.", rich_help_panel=Panel.MODEL)
]
Engine = Annotated[
    str | None,
    typer.Option(help="Inference engine: vllm (default where installed) or hf.", rich_help_panel=Panel.ENGINE),
]
Dtypes = Annotated[
    str, typer.Option(help="Engine dtypes, comma-separated (bf16, fp16, fp32).", rich_help_panel=Panel.MODEL)
]
Pairs = Annotated[
    str,
    typer.Option(
        help="default: each engine dtype vs itself and fp32; all: every engine x trainer dtype.",
        rich_help_panel=Panel.REFERENCE,
    ),
]
Temperature = Annotated[float, typer_option(TEMPERATURE)]
TopP = Annotated[
    float,
    typer.Option(
        help="Nucleus sampling threshold in (0, 1]; the trainer applies the same.", rich_help_panel=Panel.SAMPLING
    ),
]
MaxTokens = Annotated[int, typer_option(MAX_TOKENS)]
Seed = Annotated[int, typer_option(SEED)]
Out = Annotated[
    Path | None,
    typer.Option(help="Output folder (default reports/<name>-<timestamp>/).", rich_help_panel=Panel.OUTPUT),
]
Force = Annotated[
    bool,
    typer.Option(
        help="Replace an earlier run in --out: its files are removed first (a folder holding other files is refused).",
        rich_help_panel=Panel.OUTPUT,
    ),
]
Resume = Annotated[
    bool,
    typer.Option(
        help="Continue an interrupted scan in --out from its saved engine outputs.", rich_help_panel=Panel.OUTPUT
    ),
]
Dtype = Annotated[
    str, typer.Option(help="Precision of engine and policy compute (bf16, fp16, fp32).", rich_help_panel=Panel.MODEL)
]
Compare = Annotated[
    str | None,
    typer.Option(
        help="Run once per dtype (e.g. bf16,fp16) with the same seed and data, one report.", rich_help_panel=Panel.MODEL
    ),
]
Dumps = Annotated[
    list[Path],
    typer.Argument(
        help="The dump: open-format .parquet/.jsonl files or folders, a prime-rl token_exports folder, slime rollout"
        " .pt files.",
        show_default=False,
    ),
]


def config_options(config: type, leave_out: Collection[str]) -> list[inspect.Parameter]:
    """A keyword parameter for each field of `config` that declares an `Option`, as typer reads it."""
    types = typing.get_type_hints(config)
    parameters = []
    for config_field in dataclasses.fields(config):
        declared = declared_option(config_field)
        if declared is None or config_field.name in leave_out:
            continue
        kind = types[config_field.name]
        default = field_default(config_field)
        if declared.text is not None:  # a list given as comma-separated text
            kind = str
            default = ",".join(default)
        parameters.append(
            inspect.Parameter(
                config_field.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=Annotated[kind, typer_option(declared)],
            )
        )
    return parameters


def parse_texts(config: type | None, parsed: dict[str, Any]) -> dict[str, Any]:
    """`parsed` with each list option given as text parsed by its `Option.text`."""
    for config_field in dataclasses.fields(config) if config is not None else ():
        declared = declared_option(config_field)
        if declared is not None and declared.text is not None and config_field.name in parsed:
            parsed[config_field.name] = declared.text(parsed[config_field.name])
    return parsed


def panel_rank(parameter: inspect.Parameter) -> int:
    """Where the parameter's `--help` panel comes in `PANELS` (arguments first)."""
    panel = typing.get_args(parameter.annotation)[1].rich_help_panel
    return PANELS.index(panel) if panel in PANELS else -1


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's pre-emption, `kill`): the run stops as on Ctrl-C."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises `Terminated`, once: a second SIGTERM ends the process at once."""

    def terminated(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_code(interrupt: KeyboardInterrupt) -> int:
    """The exit code of an interrupted command: 143 after SIGTERM, 130 after Ctrl-C, 128 + the signal as shells
    and job schedulers report a process the signal ended, so a pre-empted run reads as pre-empted."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


def command(config: type | None = None, *, leave_out: Collection[str] = ()) -> Callable[[Callable], Callable]:
    """Register a command: its own parameters, and the options `config` declares (passed in `**options`).
    User-facing errors end as one line on stderr and exit code 2."""

    def register(function: Callable) -> Callable:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(function, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        derived = config_options(config, leave_out) if config is not None else []
        assert not {p.name for p in own} & {p.name for p in derived}, "an option declared twice"
        parameters = sorted(own + derived, key=panel_rank)

        @functools.wraps(function)
        def run(**parsed: Any) -> Any:
            try:
                with sigterm_as_interrupt():
                    return function(**parse_texts(config, parsed))
            except MismatchError as exc:
                errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except KeyboardInterrupt as exc:  # a command that does not say more itself (scan does)
                errors.print(
                    "interrupted: nothing is left looking complete; run the command again",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(interrupted_code(exc)) from None

        # typer reads the options from the signature
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]  # not in typeshed's wrapper
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return app.command(function.__name__)(run)

    return register


def print_version(asked: bool) -> None:
    if asked:
        console.print(f"{DISTRIBUTION} {package_version(DISTRIBUTION)}", highlight=False)
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """With no command, `mismatch` scans the embedded default model."""
    quiet.libraries()
    if ctx.invoked_subcommand is None:
        group = ctx.command
        assert isinstance(group, typer.core.TyperGroup)
        ctx.invoke(group.commands["scan"])


@command(ScanConfig)
def scan(
    *,
    model: Model = DEFAULT_MODEL,
    engine: Engine = None,
    dtypes: Dtypes = "bf16,fp16",
    pairs: Pairs = "default",
    temperature: Temperature = Sampling.temperature,
    top_p: TopP = Sampling.top_p,
    max_tokens: MaxTokens = Sampling.max_tokens,
    seed: Seed = Sampling.seed,
    out: Out = None,
    force: Force = False,
    resume: Resume = False,
    **options: Any,
) -> None:
    """Generate with the engine, rescore the same tokens with HF per dtype, and report the gap."""
    if resume and out is None:
        raise ConfigError("--resume needs the --out folder of the scan to continue")
    config = ScanConfig(
        model=model,
        engine=pick_engine(engine),
        dtypes=parse_dtypes(dtypes),
        out=out or default_run_dir(model),
        sampling=Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed),
        all_pairs=pairs_mode(pairs),
        **options,
    )
    if config.engine == "vllm":
        notice_vllm_range()
    from mismatch.commands.scan import run_scan  # heavy imports after the arguments are known to be good

    try:
        with RichProgress() as progress:
            summary = run_scan(config, progress, resume=resume, force=force)
    except KeyboardInterrupt as exc:
        errors.print(
            f"interrupted: {config.out} is marked incomplete; continue with the same command and --resume --out"
            f" {config.out}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(interrupted_code(exc)) from None
    except EngineDied as exc:
        raise EngineDied(
            f"{exc}; {config.out} is marked incomplete: continue with the same command and --resume --out {config.out}"
        ) from None
    console.print(pair_table_view(summary["pairs"]))
    if skipped := summary["skipped_prompts"]:
        errors.print(
            f"skipped {len(skipped)} prompt(s) that do not fit the context with --max-tokens {max_tokens} (--strict to"
            " fail instead)"
        )
    for dtype, reason in summary["refused_dtypes"].items():
        errors.print(
            f"notice: {config.engine} refuses {dtype} for this model ({reason}); {dtype} was measured on the trainer"
            " side only",
            highlight=False,
            soft_wrap=True,
        )
    if headroom := summary.get("fp16_headroom"):
        console.print(f"FP16 headroom: {headroom_text(headroom)}", highlight=False)
    print_distribution(summary)
    console.print(f"[bold]Verdict:[/] {summary['recommendation']['summary']}", highlight=False)
    console.print(f"Run folder: {config.out} (report.html, summary.md, tokens.parquet, summary.json)")
    gate_exit(summary)


def gate_exit(summary: dict) -> None:
    """The gate's notices and failures; exit 1 when a condition holds."""
    for condition in summary.get("gate", {}).get("not_measured", []):
        errors.print(f"notice: {condition}", highlight=False, soft_wrap=True)
    if failed := summary.get("gate", {}).get("failed"):
        for condition in failed:
            errors.print(f"[bold red]gate failed:[/] {condition}", highlight=False)
        raise typer.Exit(1)


# diagnose measures one GPU's engine at the scan's own pairs, with no gate and no adapter
NOT_DIAGNOSED = (
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "fail_on",
    "strict",
    "semantic_probe",
    "impact",
    "train_batch",
)


@command(DiagnoseConfig, leave_out=(*NOT_DIAGNOSED, "reference", "lora"))
def diagnose(
    *,
    model: Model = DEFAULT_MODEL,
    dtypes: Dtypes = "bf16,fp16",
    max_tokens: MaxTokens = Sampling.max_tokens,
    seed: Seed = Sampling.seed,
    out: Out = None,
    force: Force = False,
    **options: Any,
) -> None:
    """Where the gap comes from: semantic, engine decode and batching, trainer batching, precision per side, per layer.

    Each component is measured on the same sampled tokens, changing one thing."""
    settings: dict[str, Any] = {
        "model": model,
        "dtypes": parse_dtypes(dtypes),
        "sampling": Sampling(max_tokens=max_tokens, seed=seed),
    } | options
    if options["from_run"]:  # the scan's own settings, so that the rollouts are what they claim to be
        settings |= scanned_settings(options["from_run"])
    config = DiagnoseConfig(
        engine="vllm",
        out=out or default_run_dir(settings["model"], "diagnose"),
        semantic_probe=0,  # diagnose measures the semantic component on every sequence
        **settings,
    )
    notice_vllm_range()
    from mismatch.commands.diagnose import run_diagnose

    with RichProgress() as progress:
        summary = run_diagnose(config, progress, force=force)
    console.print(diagnosis_table_view(summary["diagnosis"]["components"]))
    print_distribution(summary)
    console.print(f"[bold]Verdict:[/] {summary['recommendation']['summary']}", highlight=False)
    console.print(f"Run folder: {config.out} (report.html, summary.md, tokens.parquet, topk.parquet, summary.json)")


def print_distribution(summary: dict[str, Any]) -> None:
    """The full-distribution view's lines (scan --full-distribution, diagnose): does the sampled-token k3
    agree with the exact KL, or why the engine's rows are missing."""
    for line in distribution_view(summary.get("distribution"))[0]:
        console.print(f"Whole distribution, {line}", highlight=False, soft_wrap=True)


def scanned_settings(run: Path) -> dict[str, Any]:
    """The model, prompts and sampling a scan run folder records, as `DiagnoseConfig` fields."""
    from mismatch.runs import scan_settings

    scanned = scan_settings(run)
    return {k: scanned[k] for k in ("model", "dtypes", "num_prompts", "samples", "chat_template")} | {
        "prompts": scanned["prompts"] and Path(scanned["prompts"]),
        "sampling": Sampling(max_tokens=scanned["sampling"]["max_tokens"], seed=scanned["sampling"]["seed"]),
    }


@command(AnalyzeConfig)
def analyze(paths: Dumps, out: Out = None, force: Force = False, **options: Any) -> None:
    """The mismatch of your own RL run, read from its dumps.

    Per pair and per step: health in each framework's terms, a setup audit, and what each correction would do."""
    config = AnalyzeConfig(paths=paths, out=out or default_run_dir(paths[0].resolve().name, "analyze"), **options)
    from mismatch.commands.analyze import run_analyze

    with RichProgress() as progress:
        summary = run_analyze(config, progress, force=force)
    console.print(pair_table_view(summary["pairs"]))
    for a in summary["audit"]:
        if a["status"] in ("warn", "fail"):
            errors.print(
                f"audit {a['status']}: {a['check']} ({a['pair']}): {a['detail']}", highlight=False, soft_wrap=True
            )
    for growth in summary["growth"]:
        console.print(f"{growth['pair']}: {growth['sentence']}", highlight=False)
    console.print(f"[bold]Verdict:[/] {summary['recommendation']['summary']}", highlight=False)
    steps = ", steps.parquet" if summary["n_steps"] > 1 else ""
    console.print(
        f"Run folder: {config.out} (report.html, summary.md, tokens.parquet, metrics.csv{steps}, summary.json)"
    )
    gate_exit(summary)


@command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder: scan, diagnose, train or compare.")]) -> None:
    """Rebuild a run folder's report (report.html; summary.md for a scan or a diagnose) from its saved data."""
    from mismatch.report import write_report

    for path in write_report(run_dir):
        console.print(f"wrote {path}")


@command()
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


@command(TrainConfig)
def train(
    *,
    model: Model = DEFAULT_MODEL,
    engine: Engine = None,
    dtype: Dtype = "bf16",
    compare: Compare = None,
    out: Out = None,
    force: Force = False,
    **options: Any,
) -> None:
    """A minimal GRPO loop: vLLM rollouts, HF policy, weight sync every step; reward and mismatch per step."""
    config = TrainConfig(
        model=model,
        engine=pick_engine(engine),
        dtypes=parse_dtypes(compare or dtype),
        out=out or default_run_dir(model, "train"),
        **options,
    )
    if config.engine == "vllm":
        notice_vllm_range()
    from mismatch.commands.train import run_training

    summaries = run_training(
        config, on_step=lambda dtype, row: console.print(step_line(dtype, row), highlight=False), force=force
    )
    if summaries[-1]["interrupted"]:
        errors.print(f"interrupted after {summaries[-1]['steps_done']} step(s); writing what there is")
    for run in summaries:
        if run.get("growth"):
            label = f"{run['config']['dtype']}" + (
                f" seed {run['config']['seed']}" if len(config.seed_list()) > 1 else ""
            )
            console.print(f"{label}: {growth_sentence(run['growth'])}", highlight=False)
    console.print(f"Run folder: {config.out} (report.html, metrics.csv, checkpoint-final/)")


DOCTOR_STYLES = {"pass": "green", "fail": "bold red", "not on this platform": "yellow"}


@command()
def doctor() -> None:
    """Run this first on a new machine: platform, versions, then each capability on a tiny model (a minute or two).

    Exit code 1 when a check failed; a capability this platform lacks is named, not failed."""
    from rich.text import Text

    from mismatch.commands.doctor import row_line, run_doctor

    notice_vllm_range()

    def print_facts(facts: dict[str, str]) -> None:
        for name, fact in facts.items():
            console.print(f"{name}: {fact}", highlight=False, markup=False)

    result = run_doctor(
        on_platform=print_facts,
        on_row=lambda row: console.print(Text(row_line(row), style=DOCTOR_STYLES[row.status]), soft_wrap=True),
    )
    counts = ", ".join(f"{sum(row.status == s for row in result.checks)} {s}" for s in DOCTOR_STYLES)
    console.print(f"{counts}; {result.seconds:.0f} s", highlight=False)
    raise typer.Exit(result.exit_code)


def notice_vllm_range() -> None:
    """One line on stderr, before a vLLM engine starts, when the installed vLLM is outside the range this
    code was read against (`engines.vllm_support.VLLM_RANGE`): a notice, not an error."""
    if notice := vllm_range_notice():
        errors.print(notice, highlight=False, soft_wrap=True)


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
