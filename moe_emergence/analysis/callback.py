"""RoutingAnalysis: measure what the experts do, on a fixed probe, in eval mode, during fit.

Every ``every_n_steps`` optimizer steps, at the start of a fresh run (step 0) and at the end of
fit, the probe (:mod:`moe_emergence.analysis.probe`) is routed in eval mode (no router noise, no
dropout, no grad, no random numbers drawn), each DDP rank routing a disjoint share; the
assignments are summed over ranks once and rank 0 scores them
(:func:`moe_emergence.analysis.scores.score_layer`) and writes ``<run dir>/routing/``:
``counts.csv``, ``trajectory.csv``, ``train_window_counts.csv``, the field's specialisation
metrics but saturation (``specialisation.csv``, ``repetition.csv``, ``relative_load.csv``; see
:mod:`moe_emergence.analysis.tables`), ``probe.json``, and at the end ``heatmap.png``,
``emergence.png``, and router saturation: every analysis step's routing against the final
one's (``saturation.csv``, ``saturation.png``). Rank 0 also sends each analysis's per-layer
scores, at the end the saturation of every analysis step at that step, and the figures, to the
trainer's loggers (:mod:`moe_emergence.analysis.logger_sink`).

For saturation rank 0 keeps each analysis step's top-k experts of the probe's scored tokens
(the routing summed over ranks holds every token: each probe row is routed by one rank),
int8 (int16 above 128 experts): MoE layers x scored tokens x k bytes per analysis step.

Training-time routing (noisy, train mode) is only counted per window between two analysis
steps, labelled as such. Its counters are plain tensors per rank; a checkpoint stores their
sum over ranks, and a resume on any number of ranks gives it back to rank 0 only, so nothing
is counted twice. The rows written so far, and the stored experts behind saturation, travel
in the checkpoint too: a resumed run's ``routing/`` holds the whole trajectory, and its
saturation every analysis step (a checkpoint saved before saturation was measured here holds
no experts: saturation then covers the steps analysed since the resume, and the log says so).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib.figure import Figure

from moe_emergence.analysis.logger_sink import (
    log_routing_figures,
    log_routing_scalars,
    log_saturation_scalars,
)
from moe_emergence.analysis.plots import (
    emergence_figure,
    heatmap_figure,
    saturation_figure,
    save_figure,
)
from moe_emergence.analysis.probe import (
    PROBE_FILE,
    Probe,
    build_probe,
    route_blocks,
    score_probe_routing,
)
from moe_emergence.analysis.scores import LayerScores, collapsed_expert
from moe_emergence.analysis.settings import ProbeSettings
from moe_emergence.analysis.specialisation import router_saturation, specialise_probe
from moe_emergence.analysis.tables import (
    COUNTS,
    SATURATION,
    SPECIALISATION_TABLES,
    TRAIN_WINDOWS,
    TRAJECTORY,
    routing_rows,
    saturation_rows,
    specialisation_rows,
    write_table,
)
from moe_emergence.distributed import sum_over_ranks
from moe_emergence.files import write_atomic
from moe_emergence.model.gpt2_moe import moe_layers

log = logging.getLogger(__name__)

STATE_VERSION = 1
COLLAPSE_SHARE = 0.9


class RoutingAnalysis(L.Callback):
    """Eval-mode routing of a fixed probe over training (see the module docstring).

    Its settings (when, which probe, the null) are :class:`ProbeSettings`; ``out_dir`` None is
    ``<trainer.default_root_dir>/routing``.
    """

    def __init__(self, **settings: Any) -> None:
        """``settings``: the ``callbacks.routing_analysis.*`` keys (:class:`ProbeSettings`;
        its defaults for those not given), checked here."""
        self.settings = ProbeSettings.from_fields(settings)
        for key, value in self.settings.to_dict().items():  # self.every_n_steps, ...
            setattr(self, key, value)

        self.probe: Probe | None = None
        self.seconds = 0.0  # wall time spent analysing, this process
        self._bars = False  # progress bars (rank 0, when the trainer shows its own)
        self._layers: list[int] = []
        self._n_experts = 0
        self._domains: tuple[str, ...] = ()
        self._rank, self._world = 0, 1
        self._out: Path | None = None
        self._window: torch.Tensor | None = None  # [L, D, E] this rank's training-time counts
        self._restored_window: torch.Tensor | None = None
        self._window_start = 0
        self._last_step: int | None = None
        self._rows: dict[str, list[dict[str, Any]]] = {
            "counts": [],
            "trajectory": [],
            "windows": [],
            **{name: [] for name in SPECIALISATION_TABLES},
        }
        self._latest: dict[int, tuple[np.ndarray, LayerScores]] = {}
        # rank 0: analysis step -> int8/int16 [L, N, k] experts of the probe's N scored tokens
        self._experts: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ lifecycle

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers = moe_layers(pl_module.model)
        if not layers:
            rank_zero_info("No MoE layers (a dense model): routing analysis is off.")
            return
        self._layers = sorted(layers)
        self._n_experts = layers[self._layers[0]].n_experts
        self._domains = tuple(pl_module.domains)
        self._rank, self._world = trainer.global_rank, trainer.world_size
        self._out = Path(self.out_dir or Path(trainer.default_root_dir) / "routing")
        self.probe = build_probe(
            trainer.datamodule,
            self._domains,
            self.train_sample_blocks,
            self.held_out_blocks,
            self.probe_seed,
            self.size_matched,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._layers:
            return
        shape = (len(self._layers), len(self._domains), self._n_experts)
        self._window = torch.zeros(shape, dtype=torch.long, device=pl_module.device)
        if self._restored_window is not None:
            self._window += self._restored_window.to(self._window.device)
            self._restored_window = None
        if self._rank == 0:
            self._out.mkdir(parents=True, exist_ok=True)
            write_atomic(self._out / PROBE_FILE, json.dumps(self.probe.describe(), indent=2))
            self._write_tables()
            log.info(self._cost_line(trainer))
        self._bars = self._rank == 0 and trainer.progress_bar_callback is not None
        if self._last_step is None:  # a fresh run: where routing starts
            self._analyse(trainer, pl_module)
        elif self._rank == 0 and self._last_step == trainer.global_step:
            # Resumed at an analysis step: its scores go to the loggers again (an in-place
            # resume keeps the metrics rows logged before the step, and this step is not
            # analysed again).
            rows = [r for r in self._rows["trajectory"] if int(r["step"]) == self._last_step]
            log_routing_scalars(trainer, rows)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._layers:
            return
        self._count_training_batch(pl_module, batch)
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0:
            self._analyse(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._layers:
            return
        if trainer.global_step != self._last_step:
            self._analyse(trainer, pl_module)
        if self._rank == 0:
            started = time.perf_counter()
            self._finish(trainer)
            self.seconds += time.perf_counter() - started
            log.info(
                "Routing analysis took %.1f s in all (probe, scores, tables, figures).",
                self.seconds,
            )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Called on every rank when a checkpoint is saved (collective under DDP)."""
        if not self._layers or self._window is None:
            return {}
        return {
            "version": STATE_VERSION,
            "probe_digest": self.probe.digest,
            "layers": self._layers,
            "last_step": self._last_step,
            "window_start": self._window_start,
            "window": sum_over_ranks(self._window).cpu(),  # the global sum, saved once
            "rows": self._rows,
            "experts": self._experts,  # rank 0's (the one saved)
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state or not self._layers:
            return
        if state.get("version") != STATE_VERSION or state.get("layers") != self._layers:
            rank_zero_warn(
                "The checkpoint's routing-analysis state is of another version or "
                "other layers: the trajectory starts again here."
            )
            return
        # Training-time counts of the open window: rank 0 resumes the global sum.
        window = state["window"]
        self._restored_window = window if self._rank == 0 else torch.zeros_like(window)
        self._window_start = int(state["window_start"])
        if state["probe_digest"] != self.probe.digest:
            rank_zero_warn(
                "The probe differs from the checkpoint's (other data or probe settings): the "
                "routing trajectory restarts at the resumed step; earlier rows stay in the "
                "earlier run's routing/ folder."
            )
            return
        self._last_step = state["last_step"]
        self._rows = {k: list(v) for k, v in state["rows"].items()}
        for name in SPECIALISATION_TABLES:  # a state saved before these tables: none yet
            self._rows.setdefault(name, [])
        if "experts" not in state:  # saved before saturation was measured during training
            rank_zero_warn(
                "The checkpoint holds no routing of the earlier analysis steps: "
                "routing/saturation.csv will cover the steps analysed from here on (analyze "
                "measures it on every checkpoint)."
            )
        elif self._rank == 0:
            self._experts = dict(state["experts"])

    # ------------------------------------------------------------------ measuring

    @torch.no_grad()
    def _count_training_batch(self, pl_module: L.LightningModule, batch: Any) -> None:
        """Add this micro-batch's training-time (noisy) assignments to the open window."""
        index = {d: i for i, d in enumerate(self._domains)}
        block_domains = torch.tensor([index[d] for d in batch["domains"]])
        # Pageable host memory, no stream synchronisation; counts added on the device by
        # index_add_ (bincount would read its size back to the host).
        block_domains = block_domains.to(self._window.device, non_blocking=True)
        token_domains = block_domains.repeat_interleave(batch["input_ids"].shape[1])
        layers = moe_layers(pl_module.model)
        n_experts = self._n_experts
        for n, layer in enumerate(self._layers):
            indices = layers[layer].last_indices  # [N, k] of this micro-batch's forward
            k = indices.shape[-1]
            flat = token_domains.repeat_interleave(k) * n_experts + indices.reshape(-1)
            window = self._window[n].view(-1)
            window.index_add_(0, flat, torch.ones_like(flat, dtype=window.dtype))

    def _analyse(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Route the probe (every rank its share), sum over ranks once, score on rank 0."""
        started = time.perf_counter()
        step = int(trainer.global_step)
        probe, device = self.probe, pl_module.device
        p, t = probe.input_ids.shape
        mine = torch.arange(self._rank, p, self._world)
        routed = route_blocks(
            pl_module.model,
            torch.from_numpy(probe.input_ids[mine.numpy()]).to(device),
            self.batch_size,
            trainer.precision_plugin.forward_context,
            block_domains=torch.from_numpy(probe.block_domains[mine.numpy()]).to(device),
            progress=f"routing analysis, step {step}: probe" if self._bars else None,
        )
        k = routed.experts[self._layers[0]].shape[-1]
        experts = torch.zeros(len(self._layers), p, t, k, dtype=torch.long, device=device)
        entropy = torch.zeros(len(self._layers), dtype=torch.float64, device=device)
        for n, layer in enumerate(self._layers):
            experts[n, mine.to(device)] = routed.experts[layer]
            entropy[n] = routed.entropy_sum[layer]
        # Every probe row is filled by exactly one rank: the sum is the whole probe's routing.
        experts, entropy = sum_over_ranks(experts), sum_over_ranks(entropy)
        window = sum_over_ranks(self._window)
        self._window.zero_()
        routed_at = time.perf_counter()
        if self._rank == 0:
            trajectory = self._record(
                step, experts.cpu().numpy(), (entropy / (p * t)).tolist(), window.cpu().numpy()
            )
            log_routing_scalars(trainer, trajectory)
            if self.log_figures == "every":
                log_routing_figures(trainer, self._figures(step))
            log.info(
                "Routing analysis at step %d: %.1f s routing the probe, %.1f s scoring.",
                step,
                routed_at - started,
                time.perf_counter() - routed_at,
            )
        self._last_step, self._window_start = step, step
        self.seconds += time.perf_counter() - started

    def _cost_line(self, trainer: L.Trainer) -> str:
        """What each analysis costs, said before the first: when, what it routes, its nulls."""
        p, t = self.probe.input_ids.shape
        steps = trainer.max_steps
        count = (
            f"{len({0, *range(0, steps, self.every_n_steps), steps})} analyses in {steps} steps"
            if steps > 0
            else "analyses"
        )
        return (
            f"Routing analysis: at step 0, every {self.every_n_steps} steps and at the end "
            f"({count}); each routes the probe ({p:,} blocks x {t} tokens, eval mode, no grad, "
            f"{self.batch_size} blocks a forward) and draws {self.null_permutations} "
            f"permutations a null for {len(self._layers)} MoE layers (scoring: numpy, one "
            f"process, memory bounded by the probe's size, not the permutations); each says "
            f"its time when done. Fewer: callbacks.routing_analysis.every_n_steps, "
            f"null_permutations."
        )

    def _record(
        self, step: int, experts: np.ndarray, entropy: list[float], window: np.ndarray
    ) -> list[dict[str, Any]]:
        """Score and append the rows of one analysis step; rewrite the tables (rank 0). Returns
        the step's trajectory rows."""
        kind = self.probe.kind
        scored = score_probe_routing(
            self.probe,
            {layer: experts[n] for n, layer in enumerate(self._layers)},
            dict(zip(self._layers, entropy, strict=True)),
            self._n_experts,
            self.null_permutations,
            self.null_seed,
            progress=f"routing analysis, step {step}: nulls" if self._bars else None,
        )
        counts, trajectory = routing_rows(
            step,
            kind,
            self._domains,
            {layer: table for layer, (table, _) in scored.items()},
            {layer: scores for layer, (_, scores) in scored.items()},
        )
        self._rows["counts"] += counts
        self._rows["trajectory"] += trajectory
        self._record_specialisation(step, experts, scored)
        dtype = torch.int8 if self._n_experts <= 128 else torch.int16
        self._experts[step] = torch.from_numpy(experts[:, self.probe.scored]).to(dtype)
        if step > self._window_start:  # training-time counts of the window that ends here
            for n, layer in enumerate(self._layers):
                for d, domain in enumerate(self._domains):
                    for e in range(self._n_experts):
                        self._rows["windows"].append(
                            {
                                "step_start": self._window_start,
                                "step_end": step,
                                "layer": layer,
                                "domain": domain,
                                "expert": e,
                                "assignments": int(window[n, d, e]),
                            }
                        )
        self._latest = scored
        self._write_tables()
        return trajectory

    def _record_specialisation(self, step: int, experts: np.ndarray, scored: dict) -> None:
        """Append the rows of the field's specialisation metrics of one analysis step (all
        but saturation, which needs the final checkpoint: ``analyze``)."""
        metrics = specialise_probe(
            self.probe,
            {layer: experts[n] for n, layer in enumerate(self._layers)},
            None,
            self._n_experts,
            self.null_permutations,
            self.null_seed,
            self.vocab_min_count,
        )
        counts = {layer: table for layer, (table, _) in scored.items()}
        rows = specialisation_rows(step, self.probe.kind, self._domains, counts, metrics)
        for name, new in zip(SPECIALISATION_TABLES, rows, strict=True):
            self._rows[name] += new

    def _write_tables(self) -> None:
        for name, columns in SPECIALISATION_TABLES.items():
            write_table(self._out / f"{name}.csv", columns, self._rows[name])
        write_table(self._out / "counts.csv", COUNTS, self._rows["counts"])
        write_table(self._out / "trajectory.csv", TRAJECTORY, self._rows["trajectory"])
        write_table(self._out / "train_window_counts.csv", TRAIN_WINDOWS, self._rows["windows"])

    def _trajectory(self) -> dict[int, list[tuple[int, LayerScores]]]:
        """Per MoE layer, (step, scores) of every analysis so far."""
        trajectory: dict[int, list[tuple[int, LayerScores]]] = {}
        for row in self._rows["trajectory"]:
            trajectory.setdefault(int(row["layer"]), []).append(
                (int(row["step"]), LayerScores.from_row(row))
            )
        return trajectory

    def _figures(self, step: int) -> dict[str, Figure]:
        """The heatmap of the latest analysis (at ``step``) and the emergence figure of the
        trajectory so far."""
        kind = self.probe.kind
        tables = {layer: table for layer, (table, _) in self._latest.items()}
        scores = {layer: s for layer, (_, s) in self._latest.items()}
        return {
            "heatmap": heatmap_figure(
                tables,
                scores,
                self._domains,
                title=f"eval-mode routing of the probe ({kind}) at step {step}",
            ),
            "emergence": emergence_figure(
                self._trajectory(), title=f"domain specialisation of the probe ({kind})"
            ),
        }

    # ------------------------------------------------------------------ saturation

    def _saturation_rows(self) -> list[dict[str, Any]]:
        """The :data:`~moe_emergence.analysis.tables.SATURATION` rows of every analysis step
        whose experts are kept, against the last analysis (rank 0); none without its experts.
        The same function on the same scored tokens as ``analyze``
        (:func:`~moe_emergence.analysis.specialisation.router_saturation`)."""
        final_step = self._last_step
        final = self._experts.get(final_step)
        if final is None:
            return []
        rows = []
        for step in sorted(self._experts):
            now = self._experts[step]
            saturation = {
                layer: router_saturation(
                    now[n, None].numpy(), final[n, None].numpy(), self._n_experts
                )
                for n, layer in enumerate(self._layers)
            }
            rows += saturation_rows(step, self.probe.kind, final_step, saturation)
        return rows

    def _finish_saturation(self, trainer: L.Trainer) -> Figure | None:
        """Router saturation at the end of fit (rank 0): ``saturation.csv``, each step's values
        to the loggers at that step; returns the saturation figure (None: nothing to draw)."""
        rows = self._saturation_rows()
        if not rows:
            log.warning("No router saturation: the final analysis's routing is not kept.")
            return None
        write_table(self._out / "saturation.csv", SATURATION, rows)
        log_saturation_scalars(trainer, rows)
        analysed = {int(r["step"]) for r in self._rows["trajectory"]}
        missing = sorted(analysed - set(self._experts))
        if missing:
            log.warning(
                "Router saturation covers the analysis steps from %d on: the run resumed from a "
                "checkpoint that holds no routing of steps %s (analyze measures them).",
                min(self._experts),
                ", ".join(map(str, missing)),
            )
        points: dict[int, list[tuple[int, SimpleNamespace]]] = {}
        for row in rows:
            points.setdefault(row["layer"], []).append((row["step"], SimpleNamespace(**row)))
        title = (
            f"router saturation against step {self._last_step} beside the NMI, eval mode, "
            f"probe {self.probe.kind}"
        )
        return saturation_figure(self._trajectory(), points, title)

    # ------------------------------------------------------------------ the end

    def _finish(self, trainer: L.Trainer) -> None:
        """Figures (files; to the loggers unless every analysis sent them or none is asked;
        saturation's once, unless none is asked), router saturation, the collapse check on
        the latest eval-mode usage, a closing log line."""
        if not self._latest:
            return
        figures = self._figures(self._last_step)
        sent = set(figures) if self.log_figures == "end" else set()
        saturation = self._finish_saturation(trainer)
        if saturation is not None:
            figures["saturation"] = saturation
            if self.log_figures != "never":
                sent.add("saturation")
        for name, fig in figures.items():
            save_figure(fig, self._out / f"{name}.png")
        if sent:
            log_routing_figures(trainer, {n: f for n, f in figures.items() if n in sent})
        log.info("\n".join(self._closing_lines()))
        for layer, (table, _) in self._latest.items():
            found = collapsed_expert(table, COLLAPSE_SHARE)
            if found is not None:
                expert, share = found
                log.warning(
                    "Router collapse in layer %d: expert %d took %.1f%% of the probe's tokens "
                    "(> 90%%, eval mode). Consider a larger model.lb_coef or more router noise.",
                    layer,
                    expert,
                    100 * share,
                )

    def _closing_lines(self) -> list[str]:
        """The closing log lines: the latest analysis's scores per layer beside step 0's."""
        kind, step = self.probe.kind, self._last_step
        scores = {layer: s for layer, (_, s) in self._latest.items()}
        first = {
            int(r["layer"]): float(r["nmi"])
            for r in self._rows["trajectory"]
            if int(r["step"]) == 0
        }
        n_docs = sum(self.probe.scored_counts()[0].values())
        lines = [
            f"Routing at step {step} (eval mode, probe {kind}, "
            f"{self.probe.input_ids.shape[0]:,} blocks, {n_docs:,} documents scored; first "
            f"choice): NMI [probe 95% interval] vs step 0; document-level "
            f"null p95 and p (on I(D;E)); held-out gains (nats/token) of the domain, the token "
            f"id (its references: a domain router, a token router) and the domain beyond the "
            f"token, each with its null p"
        ]
        for layer, s in scores.items():
            base = f"{first[layer]:.4f}" if layer in first else "n/a"
            approx = " approx." if s.nmi_interval_approximate else ""
            lines.append(
                f"  layer {layer}: NMI {s.nmi:.4f} [{s.nmi_low:.4f}, {s.nmi_high:.4f}{approx}] "
                f"(step 0: {base}); null p95 {s.null_p95:.4f}, p = {s.null_p:.3f}; "
                f"domain gain {s.domain_gain:+.4f} (p = {s.domain_gain_p:.3f}); "
                f"token gain {s.token_gain:+.4f} (p = {s.token_gain_p:.3f}; references "
                f"{s.token_gain_ref_domain:+.4f}, {s.token_gain_ref_token:+.4f}); domain beyond "
                f"token {s.domain_beyond_token_gain:+.4f} (p = {s.domain_beyond_token_gain_p:.3f})"
            )
        lines.append(
            "  one run, one probe: read seeds and step 0 together (python -m "
            "moe_emergence.analyze) before reading a difference"
        )
        lines.append(f"  written to {self._out}")
        return lines
