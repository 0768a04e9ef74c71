"""The training loop's pieces: the policy (full or LoRA), the RL losses, FP16 loss scaling and the
verifiable reward. `commands.train` runs the loop."""
