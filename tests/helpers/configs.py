"""Override lists that compose the project's config into tiny, fast, offline runs."""

from __future__ import annotations


def tiny_overrides(mirror, tokenizer, run_dir, *extra: str) -> list[str]:
    """``tiny_moe`` on the CPU over a fixture mirror and tokenizer: 32-token blocks, batches of
    4, no progress bars, a metrics row every step, run outputs in ``run_dir``."""
    return [
        "model=tiny_moe",
        "trainer=cpu",
        f"data.hub_mirror={mirror}",
        f"data.tokenizer={tokenizer}",
        "data.block_size=32",
        "data.batch_size=4",
        "data.show_progress=false",
        f"paths.run_dir={run_dir}",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        "trainer.log_every_n_steps=1",
        "model.warmup_steps=2",
        *extra,
    ]


def short_demo_overrides(cache_dir, run_dir, *extra: str) -> list[str]:
    """``experiment=demo`` cut to 3 steps on 0.05 MB per domain (64-token blocks), no progress
    bars, the token cache in ``cache_dir`` and outputs in ``run_dir``."""
    return [
        "experiment=demo",
        "trainer.max_steps=3",
        "data.size_mb=0.05",
        "data.block_size=64",
        "data.show_progress=false",
        f"data.cache_dir={cache_dir}",
        f"paths.run_dir={run_dir}",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        *extra,
    ]
