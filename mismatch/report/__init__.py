"""Reports built from a run folder alone: report.html and summary.md (scan, analyze), report.html (train),
compare.html and compare.md (compare)."""

from __future__ import annotations

from pathlib import Path

from mismatch import runs


def write_report(run_dir: Path) -> list[Path]:
    """(Re)build the report of the run in `run_dir` from its saved data, whatever its kind."""
    with runs.reading(run_dir):  # a saved value this version never writes: one line, not a traceback
        return _report(run_dir)


def _report(run_dir: Path) -> list[Path]:
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
        return write_compare(Path(config["before"]), Path(config["after"]), run_dir, rebuild=True)
    from mismatch.report.html import render_report
    from mismatch.report.markdown import render_markdown

    run = runs.load_analyze(run_dir) if kind == "analyze" else runs.load_scan(run_dir)
    return _write([(run_dir / runs.REPORT_HTML, render_report(run)), (run_dir / runs.SUMMARY_MD, render_markdown(run))])


def write_compare(
    before_dir: Path, after_dir: Path, out: Path, force: bool = False, *, rebuild: bool = False
) -> list[Path]:
    """compare.html and compare.md (and the folder's summary.json) for two comparable scans; `rebuild`: the
    compare folder's own, rebuilt in place (its other files are kept)."""
    from mismatch.report.compare import check_comparable
    from mismatch.report.html import render_compare
    from mismatch.report.markdown import render_compare_markdown

    before = runs.load_scan(before_dir)
    after = runs.load_scan(after_dir)
    with runs.reading(before_dir, after_dir):  # a saved value this version never writes: one line
        check_comparable(before, after)
        pages = [render_compare(before, after), render_compare_markdown(before, after)]
    with runs.claim(out, force=force, keep=rebuild):
        log = runs.RunLog(out, "compare", {"before": str(before_dir), "after": str(after_dir)})
        written = _write([(out / runs.COMPARE_HTML, pages[0]), (out / runs.COMPARE_MD, pages[1])])
        log.finish()
    return written


def _write(files: list[tuple[Path, str]]) -> list[Path]:
    for path, text in files:
        runs.write_text(path, text)
    return [path for path, _ in files]
