"""The four commands as library functions, one shape: `run_scan`, `run_diagnose`, `run_analyze` and
`run_training` take a checked config, what to report progress to (a `Progress`; for training, a
callback per step), then keyword-only `force` (replace an earlier run in the folder; scan also has
`resume`). Each holds its folder while it runs (`runs.claim`), runs the flow inputs → engine →
rescoring → statistics → verdict → run folder → report and returns the summary written as
summary.json (training: one per dtype). Imported only by
the CLI (and by callers outside the package: the bench, a notebook)."""
