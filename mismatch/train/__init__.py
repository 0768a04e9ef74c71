"""`mismatch train`: a minimal GRPO loop that shows what the scan's mismatch does to RL."""
