"""Reports built from a run folder alone: report.html and summary.md."""

from __future__ import annotations

from pathlib import Path

from mismatch.report.content import load_run
from mismatch.runs import write_text


def write_report(run_dir: Path) -> list[Path]:
    """(Re)build report.html and summary.md in `run_dir` from its saved data."""
    from mismatch.report.html import render_report
    from mismatch.report.markdown import render_markdown

    run = load_run(run_dir)
    return _write([(run_dir / "report.html", render_report(run)), (run_dir / "summary.md", render_markdown(run))])


def write_compare(before_dir: Path, after_dir: Path, out: Path) -> list[Path]:
    """compare.html and compare.md for two comparable runs (NotComparable otherwise)."""
    from mismatch.compare import check_comparable
    from mismatch.report.html import render_compare
    from mismatch.report.markdown import render_compare_markdown

    before, after = load_run(before_dir), load_run(after_dir)
    check_comparable(before, after)
    out.mkdir(parents=True, exist_ok=True)
    return _write([(out / "compare.html", render_compare(before, after)), (out / "compare.md", render_compare_markdown(before, after))])


def _write(files: list[tuple[Path, str]]) -> list[Path]:
    for path, text in files:
        write_text(path, text)
    return [path for path, _ in files]
