"""The four commands as library functions (`run_scan`, `run_diagnose`, `run_analyze`,
`run_training`): each takes a checked config, runs the flow inputs → engine → rescoring →
statistics → verdict → run folder → report, and returns the summary. Imported only by the CLI
(and by callers outside the package: the bench, a notebook)."""
