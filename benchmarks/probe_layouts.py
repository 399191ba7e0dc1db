"""Write the layout fixtures of two real probes for tests/analysis/test_calibration.py.

The calibration tests simulate routers of known mechanism on the layout of real probes: which
document each probe token belongs to, each document's domain, the block structure, and which
tokens share an id. This script builds each probe with the project's own code (compose the
config, set up the datamodule, :func:`moe_emergence.analysis.probe.build_probe`, unmatched)
and keeps its layout only, never the text: token ids are replaced by their frequency rank in
the probe (0 = the most frequent id; ties by id), which keeps which tokens share an id.

    study  experiment=study_cpu (the offline sample corpus, data/domains=sample)
    hub    experiment=study_cpu data/domains=code_math_prose data.hub_mirror=<hub>
           data.tokenizer=<hub>/gpt2 data.size_mb=1

Regenerate (about a minute, offline; the hub layout is skipped when the mirror is absent):

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/probe_layouts.py \
        --hub /work/shared/hub --out tests/analysis/fixtures

Each file (``probe_layout_<name>.npz``) holds block_size, block_domains [P] (uint8),
token_docs [P * T] (uint16, block-major), doc_domains [U] (uint8), id_rank [P * T] (uint16),
domains (str), and overrides (the config overrides it was built with, str).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from moe_emergence.analysis.probe import Probe, build_probe
from moe_emergence.config import compose_config
from moe_emergence.train import datamodule_from_config


def layout_overrides(name: str, hub: Path | None, cache_dir: str) -> list[str]:
    """The config overrides of layout ``name`` (``study`` or ``hub``)."""
    base = ["experiment=study_cpu", f"data.cache_dir={cache_dir}"]
    if name == "study":
        return base
    return [
        *base,
        "data/domains=code_math_prose",
        f"data.hub_mirror={hub}",
        f"data.tokenizer={hub / 'gpt2'}",
        "data.size_mb=1",
    ]


def build(overrides: list[str]) -> Probe:
    """The run's unmatched probe, as the training callback builds it."""
    cfg = compose_config(overrides)
    datamodule = datamodule_from_config(overrides)
    datamodule.prepare_data()
    datamodule.setup("fit")
    s = cfg.callbacks.routing_analysis
    return build_probe(
        datamodule, datamodule.domains, s.train_sample_blocks, s.held_out_blocks, s.probe_seed
    )


def id_ranks(input_ids: np.ndarray) -> np.ndarray:
    """[N] each token's id replaced by the id's frequency rank in the probe (0: most frequent;
    ties: the smaller id first)."""
    uniq, inverse, counts = np.unique(input_ids.ravel(), return_inverse=True, return_counts=True)
    order = np.lexsort((uniq, -counts))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.ravel()]


def write_layout(probe: Probe, overrides: list[str], path: Path) -> None:
    np.savez_compressed(
        path,
        block_size=np.int64(probe.input_ids.shape[1]),
        block_domains=probe.block_domains.astype(np.uint8),
        token_docs=probe.token_docs.ravel().astype(np.uint16),
        doc_domains=probe.doc_domains.astype(np.uint8),
        id_rank=id_ranks(probe.input_ids).astype(np.uint16),
        domains=np.array(",".join(probe.domains)),
        overrides=np.array(" ".join(o for o in overrides if "cache_dir" not in o)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hub", type=Path, default=Path("/work/shared/hub"))
    parser.add_argument("--out", type=Path, default=Path("tests/analysis/fixtures"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache_dir:
        for name in ("study", "hub"):
            if name == "hub" and not args.hub.is_dir():
                print(f"{args.hub} is absent: the hub layout is not written")
                continue
            overrides = layout_overrides(name, args.hub, cache_dir)
            probe = build(overrides)
            path = args.out / f"probe_layout_{name}.npz"
            write_layout(probe, overrides, path)
            print(
                f"{path}: {probe.input_ids.shape} blocks, {probe.n_docs} documents, "
                f"{path.stat().st_size:,} bytes"
            )


if __name__ == "__main__":
    main()
