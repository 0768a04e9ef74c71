"""Hooks that dump μ (sampling engine) and π (trainer) per token from inside a training framework's loop."""
