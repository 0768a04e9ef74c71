"""Measure the training-inference mismatch of an LLM. The import package and the command are
`mismatch`; the distribution on the package index is `DISTRIBUTION` (`mismatch` there is another project)."""

DISTRIBUTION = "mismatch-rl"
