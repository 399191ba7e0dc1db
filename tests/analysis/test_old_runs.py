"""Runs made before a data setting existed (#29 item 6): ``analyze`` and ``inspect`` rebuild their
probe with the value that reproduces them (``data.settings.ADDED_LATER``), or refuse naming the
setting. A run of the code before ``data.eval_min_texts`` (8f849e6) is made here from a run of
today's code with ``data.eval_min_texts=0`` (the same split), rewritten as that code wrote it:
no ``eval_min_texts`` in its checkpoints' data settings, the data fingerprint without it, and a
``probe.json`` whose digest covers the blocks only (as before 962fedb)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.script import train_in

from moe_emergence.analysis.analyze import main as analyze
from moe_emergence.analysis.evaluate import rebuild_probe
from moe_emergence.analysis.inspect import main as inspect
from moe_emergence.analysis.loading import load_checkpoint
from moe_emergence.analysis.tables import read_table
from moe_emergence.checkpoints import write_sidecar
from moe_emergence.data.settings import ADDED_LATER, as_made
from moe_emergence.runs.record import RunRecord


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_cache) -> dict[str, Path]:
    """``train.py -m experiment=debug data/domains=sample data.eval_min_texts=0,20``: two 2-step
    runs on 0.05 MB of the sample corpus, 10% of texts held out, with no floor (the split of the
    code before it) and with the floor of 20."""
    root = tmp_path_factory.mktemp("old-runs")
    sweep = train_in(
        root,
        "-m",
        "experiment=debug",
        "data/domains=sample",
        "data.size_mb=0.05",
        "data.eval_fraction=0.1",
        "data.eval_min_texts=0,20",
        "trainer.max_steps=2",
        cache_dir=sample_cache,
    )
    found = {}
    for run_dir in (p for p in sweep.iterdir() if (p / ".hydra").is_dir()):
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        found["no_floor" if "eval_min_texts=0" in overrides else "floor"] = run_dir
    return found


def _old_fingerprint(run_dir: Path) -> str:
    """The data fingerprint as 8f849e6 computed it: held-out split [eval_fraction, eval_seed]."""
    report = json.loads((run_dir / "data_report.json").read_text())
    manifest = json.loads((Path(report["cache"]["path"]) / "manifest.json").read_text())
    tokens = {d: [e["tokens_sha256"], e["offsets_sha256"]] for d, e in manifest["domains"].items()}
    blob = json.dumps({"tokens": tokens, "held_out": [0.1, 0]}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _old_digest(run_dir: Path, report: Path) -> str:
    """The probe digest as 8f849e6 computed it (blocks and domains), of the run's probe as
    today's code rebuilds and checks it."""
    loaded = load_checkpoint(run_dir / "checkpoints" / "last.ckpt", require_moe=False)
    probe = rebuild_probe("run", loaded, RunRecord(run_dir), report)[3]
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(probe.input_ids, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(probe.block_domains, dtype=np.int64).tobytes())
    h.update(",".join(probe.domains).encode())
    return h.hexdigest()


def _rewrite_checkpoints(run_dir: Path, fingerprint: str | None) -> None:
    """Drop ``eval_min_texts`` from every checkpoint's data settings; with ``fingerprint``, put
    it in place of the train loader's recorded data fingerprint."""
    for path in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        del checkpoint["datamodule_hyper_parameters"]["eval_min_texts"]
        loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        for state in loops.get("combined_loader") or []:
            if fingerprint is not None and "data_fingerprint" in state:
                state["data_fingerprint"] = fingerprint
        torch.save(checkpoint, path)
        write_sidecar(path)


def _as_old_code_wrote_it(run_dir: Path, folder: Path) -> Path:
    """A copy of ``run_dir`` (trained with ``eval_min_texts=0``) as 8f849e6 wrote it."""
    digest = _old_digest(run_dir, folder / "report")
    copy = folder / "old_run"
    shutil.copytree(run_dir, copy)
    _rewrite_checkpoints(copy, _old_fingerprint(run_dir))
    probe_file = copy / "routing" / "probe.json"
    probe = json.loads(probe_file.read_text())
    old = {k: probe[k] for k in ("probe", "block_size", "blocks", "tokens")} | {"digest": digest}
    probe_file.write_text(json.dumps(old, indent=2))
    return copy


def test_the_registry_fills_what_a_record_lacks():
    recorded = {"size_mb": 1.0, "eval_fraction": 0.1, "verify_cache": True}
    settings, added = as_made(recorded)
    assert settings["eval_min_texts"] is None and settings["verify_cache"] is True
    assert "data.eval_min_texts=null (added in 632c0ac" in added[0].describe()
    assert {a.name for a in added} == {a.name for a in ADDED_LATER} - {"verify_cache"}
    assert as_made({}) == ({}, [])
    assert as_made({**recorded, **{a.name: 7 for a in ADDED_LATER}})[1] == []


def test_a_run_made_before_eval_min_texts_is_analysed_with_its_training_time_counts(
    runs, tmp_path, capsys
):
    old = _as_old_code_wrote_it(runs["no_floor"], tmp_path)
    last = old / "checkpoints" / "last.ckpt"  # the checkpoint: its run is found from it
    code = analyze([str(last), "--out", str(tmp_path / "out"), "--no-progress", "--no-knockout"])
    err = capsys.readouterr().err
    assert code == 0, err
    [folder] = (tmp_path / "out" / "runs").iterdir()
    analysed = read_table(folder / "counts.csv")  # the final checkpoint's (step 2)
    trained = [r for r in read_table(old / "routing" / "counts.csv") if r["step"] == "2"]
    assert analysed == trained and len(trained) == 2 * 3 * 4  # layers x domains x experts
    html = tmp_path / "tokens.html"
    assert (
        inspect([str(old / "checkpoints" / "last.ckpt"), "--text", "x = 1", "--html", str(html)])
        == 0
    )
    assert html.is_file()


def test_a_run_whose_split_the_old_rule_cannot_rebuild_is_refused_naming_the_setting(
    runs, tmp_path, capsys
):
    """A record without ``eval_min_texts`` whose split had the floor (so no run of the old code):
    the old rule rebuilds other data, and the refusal names the setting."""
    copy = tmp_path / "run"
    shutil.copytree(runs["floor"], copy)
    _rewrite_checkpoints(copy, None)
    last = copy / "checkpoints" / "last.ckpt"
    code = analyze([str(last), "--out", str(tmp_path / "out"), "--no-progress", "--no-knockout"])
    err = capsys.readouterr().err
    assert code == 1
    [line] = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "not the data the run trained on" in line and "predates data.eval_min_texts=null" in line
