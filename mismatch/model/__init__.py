"""The trainer side: loading a model (HF, GGUF, builtin), the CPU's GPU-like numerics per dtype,
rescoring given tokens (π), LoRA adapters, MoE routing, and the probes and per-component views
that `diagnose` uses."""
