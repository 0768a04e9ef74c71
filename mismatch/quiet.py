"""Keep the terminal to our progress bars, table and verdict: library chatter off, real warnings on."""

from __future__ import annotations


def libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
