"""What the statistics mean for the user: the recommendation (verdict and ready-to-paste settings)
and the CI gate (`--fail-on`). Reads statistics rows; computes nothing from tokens."""
