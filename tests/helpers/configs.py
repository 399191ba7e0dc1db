"""Override lists that compose the project's config into tiny, fast, offline runs: the fixed
settings are ``experiment=debug`` (conf/experiment/debug.yaml); these add what varies."""

from __future__ import annotations


def tiny_overrides(mirror, tokenizer, run_dir, *extra: str) -> list[str]:
    """``experiment=debug`` (tiny_moe on the CPU, 32-token blocks, batches of 4, no progress
    bars, a metrics row every step, a 2-step warm-up) over a fixture mirror and tokenizer, run
    outputs in ``run_dir`` (None: Hydra's run or sweep-job folder)."""
    run = [] if run_dir is None else [f"paths.run_dir={run_dir}"]
    return [
        "experiment=debug",
        f"data.hub_mirror={mirror}",
        f"data.tokenizer={tokenizer}",
        *run,
        *extra,
    ]


def short_demo_overrides(cache_dir, run_dir, *extra: str) -> list[str]:
    """``experiment=demo`` with ``experiment=debug`` on top (3 steps, batches of 4, no progress
    bars), on 0.05 MB per domain in 64-token blocks, the token cache in ``cache_dir`` and
    outputs in ``run_dir``."""
    return [
        "experiment=[demo,debug]",
        "trainer.max_steps=3",
        "data.size_mb=0.05",
        "data.block_size=64",
        f"data.cache_dir={cache_dir}",
        f"paths.run_dir={run_dir}",
        *extra,
    ]
