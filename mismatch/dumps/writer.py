"""Writes the open format during someone else's training loop (the TRL and verl hooks use it).

One parquet file per (optimizer step, rank), `step_000042.rank0.parquet`, one row per sequence
with list columns: `mismatch analyze DIR` reads the folder back step by step, so the hook never
holds more than one step and the files can be read while training runs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mismatch.runs import write_parquet


class StepWriter:
    """Collects the sequences of one optimizer step and writes them when the step changes."""

    def __init__(self, out_dir: Path | str, rank: int = 0, world_size: int = 1):
        self.out_dir = Path(out_dir)
        self.rank = rank
        self.world_size = world_size
        self.step: int | None = None
        self.rows: list[dict] = []

    def add(
        self,
        step: int,
        prompt_ids,
        response_ids,
        logp_engine,
        *,
        logp_trainer=None,
        prompt_index=None,
        temperature: float | None = None,
        loss_mask=None,
        entropy=None,
    ) -> None:
        """Sequences of `step`: per sequence its prompt ids, response ids and per-token μ (and π);
        `loss_mask` (per token) marks the sampled tokens of a response that also holds tool output;
        `entropy` (per token) is the trainer's, in nats."""
        if step != self.step:
            self.flush()
            self.step = step
        for i, (prompt, response, mu) in enumerate(zip(prompt_ids, response_ids, logp_engine, strict=True)):
            row = {
                "step": step,
                "seq_id": len(self.rows) * self.world_size + self.rank,  # unique within the step across ranks
                "prompt_ids": [int(t) for t in prompt],
                "token_id": [int(t) for t in response],
                "logp_engine": [float(x) for x in mu],
            }
            if logp_trainer is not None:
                row["logp_trainer"] = [float(x) for x in logp_trainer[i]]
            if prompt_index is not None:
                row["prompt_index"] = int(prompt_index[i])
            if loss_mask is not None:
                row["loss_mask"] = [bool(m) for m in loss_mask[i]]
            if entropy is not None:
                row["entropy"] = [float(x) for x in entropy[i]]
            if temperature is not None:
                row["temperature"] = float(temperature)
            self.rows.append(row)

    def flush(self) -> Path | None:
        """Write the collected step (called by `add` on a new step; call it once more at the end)."""
        if self.step is None or not self.rows:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{self.step:06d}.rank{self.rank}.parquet"
        write_parquet(path, pd.DataFrame(self.rows))
        self.rows = []
        return path
