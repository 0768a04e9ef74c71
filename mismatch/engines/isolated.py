"""The vLLM engine in a child process: neither library can break the other, and closing it returns
all of its memory (RAM and GPU) before the trainer loads.

Why: vLLM patches classes it touches in place (its Transformers backend decorates the HF model
class with its torch.compile wrapper), after which transformers cannot build that model in the
same process ("Current vLLM config is not set", seen with OLMo-2); and an in-process engine's
memory is only returned as far as its own shutdown frees it. The child runs the real engine; this
side forwards calls over a pipe (tensors travel through shared memory), relays progress, re-raises
the child's user-facing errors as themselves, and notices a child that died (`EngineDied`, naming
the signal that killed it), even where vLLM's own workers keep the pipe open. A call interrupted
here (Ctrl-C, SIGTERM) interrupts the child too, so that closing it does not wait for the call.
"""

from __future__ import annotations

import atexit
import os
import signal
import traceback
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from mismatch import errors
from mismatch.engines.base import RowPlan, Rows
from mismatch.records import Advance, Rollout, Sampling, Scored


class _Child:
    """A spawned process running `_serve`, and the calls to it."""

    def __init__(self):
        context = mp.get_context("spawn")
        self._pipe, child = context.Pipe()
        # not a daemon: vLLM's tensor / pipeline parallel workers are its children, which a daemon
        # may not have; the child still ends with this process (its pipe closes: `_serve` returns)
        self._process = context.Process(target=_serve, args=(child,), daemon=False)
        self._process.start()
        child.close()
        self._busy = False  # a call is in flight: its answer has not been read
        atexit.register(self.stop)  # an engine never closed must not keep the interpreter waiting at exit

    def call(self, command: str, *args, progress: Advance | None = None):
        try:
            self._pipe.send((command, args))
        except OSError:  # BrokenPipeError: the child is gone
            raise self._died() from None
        self._busy = True
        while True:
            kind, payload = self._receive()
            if kind == "progress":
                if progress:
                    progress(payload)
            else:
                self._busy = False
                if kind == "result":
                    return payload
                if kind == "user_error":  # a MismatchError in the child: the same class and message here
                    error_class, message = payload
                    raise getattr(errors, error_class, errors.EngineError)(message)
                raise RuntimeError(f"the vllm engine process failed:\n{payload}")  # "crash": a bug, with its traceback

    def _receive(self) -> tuple[str, Any]:
        """The child's next message; `EngineDied` once it is gone. Its death is checked every second as well as
        at the pipe's end: vLLM's worker processes may hold the child's end of the pipe open after it."""
        try:
            while not self._pipe.poll(1.0):
                if not self._process.is_alive() and not self._pipe.poll(0):
                    raise self._died()
            return self._pipe.recv()
        except (EOFError, OSError):  # the pipe's end, or its connection reset by the child's death
            raise self._died() from None

    def _died(self) -> errors.EngineDied:
        self._process.join(timeout=10)  # the pipe can close just before the process is reaped
        code = self._process.exitcode
        if code is None or code >= 0:
            return errors.EngineDied(f"the vllm engine process ended unexpectedly (exit code {code})")
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a real-time signal
            name = f"signal {-code}"
        oom = " (as the kernel's out-of-memory killer does)" if code == -signal.SIGKILL else ""
        return errors.EngineDied(f"the vllm engine process was killed by {name}{oom}")

    def alive(self) -> bool:
        return self._process.is_alive()

    def stop(self) -> None:
        atexit.unregister(self.stop)
        pid = self._process.pid
        if self._busy and pid is not None and self._process.is_alive():  # a call interrupted here: interrupt it there
            os.kill(pid, signal.SIGINT)
        elif self._process.is_alive():
            try:
                self.call("close")
            except (errors.EngineError, OSError):
                pass
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._pipe.close()


_spare: _Child | None = None
"""The process that answered `refused_dtypes` or `punica_wrapper`: vLLM imported, no engine yet; the next engine
starts in it."""


def _engine_process() -> _Child:
    """The spare process if there is one (its start and vLLM's import are already paid), else a new one."""
    global _spare
    child = _spare if _spare is not None and _spare.alive() else _Child()
    _spare = None
    return child


class IsolatedEngine:
    """The `Engine` protocol, served by a `VLLMEngine` in a spawned child process."""

    name = "vllm"

    def __init__(self, model: Path, dtype: str, **options):
        self.dtype = dtype
        self._child = _engine_process()
        try:
            self.execution: str = self._child.call("start", model, dtype, options)  # what the child's engine runs
        except BaseException:
            self._child.stop()
            raise

    def generate(
        self, prompts: list[list[int]], samples: int, sampling: Sampling, progress: Advance | None = None
    ) -> list[Rollout]:
        return self._child.call("generate", prompts, samples, sampling, progress=progress)

    def generate_rows(
        self, prompts: list[list[int]], samples: int, sampling: Sampling, plan: RowPlan, progress: Advance | None = None
    ) -> tuple[list[Rollout], Rows | str]:
        return self._child.call("generate_rows", prompts, samples, sampling, plan, progress=progress)

    def score(self, sequences: list[tuple[list[int], list[int]]], topk: int = 0, alone: bool = False) -> list[Scored]:
        return self._child.call("score", sequences, topk, alone)

    def load_adapter(self, path: Path) -> None:
        self._child.call("load_adapter", path)

    def load_weights(self, state_dict: dict) -> None:
        self._child.call("load_weights", {name: tensor.detach().share_memory_() for name, tensor in state_dict.items()})

    def sleep(self) -> None:
        self._child.call("sleep")

    def wake_up(self) -> None:
        self._child.call("wake_up")

    def close(self) -> None:
        self._child.stop()


def refused_dtypes(model: Path, dtypes: list[str], trust_remote_code: bool) -> dict[str, str]:
    """`vllm_engine.refused_dtypes`, run in a child process (importing vLLM stays out of this one),
    which then stays up as the spare that the first engine starts in: the check adds no process start."""
    return _ask_spare("refused", model, dtypes, trust_remote_code)


def punica_wrapper() -> str:
    """`vllm_engine.punica_wrapper`, asked in the spare process as `refused_dtypes` is."""
    return _ask_spare("punica_wrapper")


def _ask_spare(command: str, *args):
    global _spare
    child = _engine_process()
    try:
        answer = child.call(command, *args)
    except BaseException:
        child.stop()
        raise
    _spare = child
    return answer


def _serve(pipe) -> None:
    """The child: answer calls until `close` (or until the parent goes away)."""
    from mismatch import quiet  # noqa: F401  # imported for its settings: the child's own terminal stays quiet too
    from mismatch.engines import vllm_engine

    vllm_engine.settle_cpu_process()
    engine: vllm_engine.VLLMEngine | None = None
    try:
        while True:
            try:
                command, args = pipe.recv()
            except EOFError:
                return
            if command == "start":
                model, dtype, options = args
                engine = vllm_engine.VLLMEngine(model, dtype, **options)
                pipe.send(("result", engine.execution))
            elif command == "refused":
                pipe.send(("result", vllm_engine.refused_dtypes(*args)))
            elif command == "punica_wrapper":
                pipe.send(("result", vllm_engine.punica_wrapper()))
            elif command == "generate":
                assert engine is not None  # the parent sends "start" first
                prompts, samples, sampling = args
                rollouts = engine.generate(prompts, samples, sampling, progress=lambda n: pipe.send(("progress", n)))
                pipe.send(("result", rollouts))
            elif command == "generate_rows":
                assert engine is not None
                prompts, samples, sampling, plan = args
                answer = engine.generate_rows(
                    prompts, samples, sampling, plan, progress=lambda n: pipe.send(("progress", n))
                )
                pipe.send(("result", answer))
            elif command == "score":
                assert engine is not None
                pipe.send(("result", engine.score(*args)))
            elif command in ("load_weights", "load_adapter", "sleep", "wake_up"):
                getattr(engine, command)(*args)
                pipe.send(("result", None))
            elif command == "close":
                if engine is not None:
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
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child too, and the parent may add one
        if engine is not None:
            engine.close()
