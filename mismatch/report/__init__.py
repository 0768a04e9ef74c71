"""Reports built from a run folder alone: report.html and summary.md (scan, analyze), report.html (train),
compare.html and compare.md (compare)."""

from __future__ import annotations

from pathlib import Path

from mismatch import runs


def write_report(run_dir: Path) -> list[Path]:
    """(Re)build the report of the run in `run_dir` from its saved data, whatever its kind."""
    kind = runs.folder_kind(run_dir)
    if kind == "train":
        from mismatch.report.training import render_training

        return _write([(run_dir / runs.REPORT_HTML, render_training(runs.train_runs(run_dir)))])
    if kind == "diagnose":
        from mismatch.report.diagnosis import render_diagnosis, render_diagnosis_markdown

        diagnosed = runs.load_diagnose(run_dir)
        return _write(
            [
                (run_dir / runs.REPORT_HTML, render_diagnosis(diagnosed)),
                (run_dir / runs.SUMMARY_MD, render_diagnosis_markdown(diagnosed)),
            ]
        )
    if kind == "compare":
        config = runs.read_summary(run_dir, ("compare",))["config"]
        return write_compare(Path(config["before"]), Path(config["after"]), run_dir, force=True)
    from mismatch.report.html import render_report
    from mismatch.report.markdown import render_markdown

    run = runs.load_analyze(run_dir) if kind == "analyze" else runs.load_scan(run_dir)
    return _write([(run_dir / runs.REPORT_HTML, render_report(run)), (run_dir / runs.SUMMARY_MD, render_markdown(run))])


def write_compare(before_dir: Path, after_dir: Path, out: Path, force: bool = False) -> list[Path]:
    """compare.html and compare.md (and the folder's summary.json) for two comparable scans."""
    from mismatch.report.compare import check_comparable
    from mismatch.report.html import render_compare
    from mismatch.report.markdown import render_compare_markdown

    before = runs.load_scan(before_dir)
    after = runs.load_scan(after_dir)
    check_comparable(before, after)
    runs.check_output_dir(out, force)
    log = runs.RunLog(out, "compare", {"before": str(before_dir), "after": str(after_dir)})
    written = _write(
        [
            (out / runs.COMPARE_HTML, render_compare(before, after)),
            (out / runs.COMPARE_MD, render_compare_markdown(before, after)),
        ]
    )
    log.finish()
    return written


def _write(files: list[tuple[Path, str]]) -> list[Path]:
    for path, text in files:
        runs.write_text(path, text)
    return [path for path, _ in files]
