"""Statistics of per-token log-probabilities: pure functions over numpy arrays and pandas frames
(no torch, no model, no engine). The pair metrics, the measures of a run, each framework's health
terms, the corrections' replay, the setup audit and drift over steps."""
