"""The vLLM engine in a child process: neither library can break the other, and closing it returns all
of its memory (RAM and GPU) before the trainer loads.

Why: vLLM patches classes it touches in place (its Transformers backend decorates the HF model
class with its torch.compile wrapper), after which transformers cannot build that model in the
same process ("Current vLLM config is not set", seen with OLMo-2); and an in-process engine's
memory is only returned as far as its own shutdown frees it. The child runs the real engine; this
side forwards `generate`, `load_weights` and `close` over a pipe (tensors travel through shared
memory), relays progress, and re-raises the child's user-facing errors as themselves.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import torch.multiprocessing as mp

from mismatch import errors
from mismatch.engines.base import Progress, Rollout, Sampling


class IsolatedEngine:
    """The `Engine` protocol, served by a `VLLMEngine` in a spawned child process."""

    name = "vllm"

    def __init__(self, model: Path, dtype: str, **options):
        self.dtype = dtype
        context = mp.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, model, dtype, options), daemon=True)
        self._process.start()
        child.close()
        try:
            self._receive()  # started, or the reason it could not start
        except BaseException:
            self._stop()
            raise

    def generate(self, prompts: list[list[int]], samples: int, sampling: Sampling, progress: Progress | None = None) -> list[Rollout]:
        self._pipe.send(("generate", (prompts, samples, sampling)))
        return self._receive(progress)

    def load_weights(self, state_dict: dict) -> None:
        self._pipe.send(("load_weights", ({name: tensor.detach().share_memory_() for name, tensor in state_dict.items()},)))
        self._receive()

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._pipe.send(("close", ()))
                self._receive()
            except (EOFError, BrokenPipeError, OSError):
                pass
        self._stop()

    def _receive(self, progress: Progress | None = None):
        while True:
            try:
                kind, payload = self._pipe.recv()
            except EOFError:
                raise errors.EngineError(f"the {self.name} engine process ended unexpectedly (exit code {self._process.exitcode}); run again with --engine hf to compare") from None
            if kind == "progress":
                if progress:
                    progress(payload)
            elif kind == "result":
                return payload
            elif kind == "user_error":  # a MismatchError in the child: the same class and message here
                error_class, message = payload
                raise getattr(errors, error_class, errors.EngineError)(message)
            else:  # "crash": a bug, with the child's traceback
                raise RuntimeError(f"the {self.name} engine process failed:\n{payload}")

    def _stop(self) -> None:
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._pipe.close()


def refused_dtypes(model: Path, dtypes: list[str], trust_remote_code: bool) -> dict[str, str]:
    """`vllm_engine.refused_dtypes`, run in a child process: importing vLLM stays out of this one."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_refused_in_child, model, dtypes, trust_remote_code).result()


def _refused_in_child(model: Path, dtypes: list[str], trust_remote_code: bool) -> dict[str, str]:
    from mismatch import quiet  # noqa: F401
    from mismatch.engines.vllm_engine import refused_dtypes as vllm_refused

    return vllm_refused(model, dtypes, trust_remote_code)


def _serve(pipe, model: Path, dtype: str, options: dict) -> None:
    """The child: start the engine, then answer requests until `close`."""
    from mismatch import quiet  # noqa: F401 (the child's own terminal stays quiet too)
    from mismatch.engines.vllm_engine import VLLMEngine

    engine = None
    try:
        engine = VLLMEngine(model, dtype, **options)
        pipe.send(("result", None))
        while True:
            command, args = pipe.recv()
            if command == "generate":
                pipe.send(("result", engine.generate(*args, progress=lambda n: pipe.send(("progress", n)))))
            elif command == "load_weights":
                engine.load_weights(*args)
                pipe.send(("result", None))
            elif command == "close":
                engine.close()
                engine = None
                pipe.send(("result", None))
                return
    except errors.MismatchError as exc:
        pipe.send(("user_error", (type(exc).__name__, str(exc))))
    except KeyboardInterrupt:
        pass
    except BaseException:
        pipe.send(("crash", traceback.format_exc()))
    finally:
        if engine is not None:
            engine.close()
