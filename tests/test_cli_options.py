"""The options as the user sees them: README's option tables agree with `--help`, every option sits in
a `--help` panel, and `mismatch --version` names the installed version."""

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import typer.core
import typer.main
from typer.testing import CliRunner

from mismatch import DISTRIBUTION
from mismatch.cli import app
from mismatch.config import PANELS

runner = CliRunner()
README = Path(__file__).parents[1] / "README.md"
COMMANDS = ("scan", "diagnose", "analyze", "train")  # the commands with an option table
HEADER = "| option | default | meaning |"


def options(command: str) -> dict[str, typer.core.TyperOption]:
    """The options `mismatch COMMAND --help` lists, by their first flag (`--help` aside)."""
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    params = group.commands[command].params
    return {p.opts[0]: p for p in params if isinstance(p, typer.core.TyperOption) and p.opts[0] != "--help"}


def readme_tables() -> dict[str, dict[str, str]]:
    """Each option table's rows, flag → default cell, under the command its heading names
    ("## `mismatch scan` options")."""
    tables: dict[str, dict[str, str]] = {}
    command = None
    rows = None
    for line in README.read_text().splitlines():
        if line.startswith("#"):
            named = re.search(r"`mismatch (\w+)`", line)
            command = named and named.group(1)
        if line.strip() == HEADER:
            assert command, f"an option table under no `mismatch COMMAND` heading: {line}"
            assert command not in tables, f"two option tables for {command}"
            rows = tables[command] = {}
        elif rows is not None and line.startswith("|"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            if set(cells[0]) <= set("-"):
                continue
            flags = re.findall(r"`(--[\w-]+)", cells[0])
            assert len(flags) == 1, f"one option per row: {line}"
            assert flags[0] not in rows, f"{command} {flags[0]}: two rows"
            rows[flags[0]] = cells[1]
        else:
            rows = None
    return tables


def agrees(cell: str, default: object) -> bool:
    """Whether README's default cell states `default`. A default of None is computed at run time
    (the model's context, the dump's temperature): the cell says how, in words."""
    text = re.sub(r" \(.*\)$", "", cell).replace("`", "").strip()  # "0 (full fine-tuning)" → "0"
    if default is None:
        return bool(text)
    if isinstance(default, bool):
        return text == ("on" if default else "off")
    if isinstance(default, list | tuple):
        return text == (",".join(map(str, default)) or "—")
    if isinstance(default, int | float):
        return re.fullmatch(r"[-+0-9.e]+", text) is not None and float(text) == default
    return text == str(default)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_documents_every_option_with_its_default_and_no_other(command):
    documented = readme_tables()[command]
    declared = options(command)
    assert sorted(set(declared) - set(documented)) == [], f"options of {command} missing in README"
    assert sorted(set(documented) - set(declared)) == [], f"README rows for options {command} does not have"
    wrong = {flag: (documented[flag], declared[flag].default) for flag in declared}
    assert {flag: pair for flag, pair in wrong.items() if not agrees(*pair)} == {}


def test_the_tables_are_read():
    """Guards the check above against a table it does not see."""
    tables = readme_tables()
    assert set(tables) == set(COMMANDS)
    assert tables["scan"]["--fail-on"] == "—" and tables["train"]["--lora-rank"] == "0 (full fine-tuning)"
    assert not agrees("`bf16`", "bf16,fp16") and not agrees("off", True) and not agrees("2e-5", 2e-6)


@pytest.mark.parametrize("command", COMMANDS + ("compare",))
def test_every_option_sits_in_a_help_panel(command):
    loose = [flag for flag, option in options(command).items() if getattr(option, "rich_help_panel", None) is None]
    assert loose == []
    assert {option.rich_help_panel for option in options(command).values()} <= set(PANELS)


def test_scan_help_groups_its_options_in_panels():
    result = runner.invoke(app, ["scan", "--help"], terminal_width=160)
    assert result.exit_code == 0
    panels = re.findall(r"╭─ (.+?) ─", result.output)
    assert panels == ["Options", "Model", "Prompts", "Sampling", "Engine", "Reference / pairs", "LoRA", "Output"] + [
        "CI gate",
        "Gradient impact",
    ]


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"mismatch-rl {version(DISTRIBUTION)}\n"


def test_a_list_given_as_text_is_parsed_with_the_config_message(tmp_path):
    """`analyze --dtypes` is a config field declared as comma-separated text: parsed before the config."""
    result = runner.invoke(app, ["analyze", str(tmp_path), "--dtypes", "bf16,int8", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown dtype int8" in result.output and "Traceback" not in result.output
