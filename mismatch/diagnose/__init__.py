"""Diagnostics: where a gap comes from, measured inside the trainer's forward."""
