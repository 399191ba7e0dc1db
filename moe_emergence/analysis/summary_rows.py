"""What the sweep summary (:mod:`moe_emergence.analysis.summary`) is made of: its settings
(confidence, alpha, power), its columns and metric lists, and the records it returns: a
:class:`SummaryRow` per group x layer x metric, a :class:`GroupInfo` per group, an
:class:`InitialModel` per shared step 0, a :class:`Family` per Holm family, the whole
:class:`Summary`."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from moe_emergence.analysis.intervals import Interval

CONFIDENCE = 0.95
ALPHA = 0.05  # family-wise error rate of every Holm family
POWER = 0.8  # the power at which ``detectable`` is stated
COLUMNS = (
    "group",
    "layer",
    "metric",
    "n",
    "mean",
    "ci_low",
    "ci_high",
    "method",
    "p",
    "p_holm",
    "family",
    "detectable",
    "seeds",
    "values",
)
# Each run's value in the row's ``values``: nmi_low / nmi_high are the runs' probe intervals
# (documents resampled; nmi_interval_approximate is 1 where their coverage may fall below 93%);
# *_p the runs' document-level permutation p-values. Each held-out gain sits beside its null
# (chance level).
ROUTING_METRICS = (
    "nmi",
    "nmi_low",
    "nmi_high",
    "nmi_interval_approximate",  # 1 where the run's probe intervals are approximate, else 0
    "null_mean",
    "null_p95",
    "null_p",
    "mi",
    "domain_gain",
    "domain_gain_null_mean",
    "domain_gain_null_p95",
    "domain_gain_p",
    "token_gain",
    "token_gain_null_mean",
    "token_gain_null_p95",
    "token_gain_p",
    "token_gain_ref_domain",
    "token_gain_ref_token",
    "domain_beyond_token_gain",
    "domain_beyond_token_gain_null_mean",
    "domain_beyond_token_gain_null_p95",
    "domain_beyond_token_gain_p",
    "cond_mi_excess",
    "cond_mi_null_p",
    "token_id_nmi",
    "usage_entropy",
    "router_entropy",
)
STEP0_METRICS = (
    "nmi",
    "mi",
    "domain_gain",
    "domain_beyond_token_gain",
    "token_gain",
    "cond_mi_excess",
    "token_id_nmi",
)
# The field's specialisation metrics (specialisation.py), each beside its chance level, at the
# final checkpoint; descriptive rows (no family). Saturation at each run's middle checkpoint
# (``_mid``): at the final it is 1 by definition. expert_tokens_replicated: the share of the
# per-expert token lists that the other half of the documents confirms.
SPECIALISATION_METRICS = (
    "coactivation_strongest",
    "coactivation_strongest_chance",
    "coactivation_uniform",
    "repetition",
    "repetition_chance",
    "repetition_null_mean",
    "repetition_p",
    "repetition_topk",
    "repetition_topk_null_mean",
    "repetition_topk_p",
    "vocab_spec",
    "vocab_spec_chance",
    "vocab_spec_ids",
)
SATURATION_METRICS = (
    "saturation_top1",
    "saturation_top1_chance",
    "saturation_topk",
    "saturation_topk_chance",
)
PRIMARY_METRICS = ("nmi", "domain_gain")
SHARE_METRICS = ("nmi", "domain_gain")
# count metric -> the LayerScores permutation p-value field it counts
ABOVE_NULL = {
    "above_null": "null_p",
    "domain_gain_above_null": "domain_gain_p",
    "domain_beyond_token_above_null": "domain_beyond_token_gain_p",
    "cond_mi_above_null": "cond_mi_null_p",
}
FAMILY_TITLES = {
    "primary_nmi": "top-1 - frozen router: NMI at the final step, paired by seed; every layer",
    "primary_domain_gain": (
        "top-1 - frozen router: held-out domain gain at the final step, paired by seed; every layer"
    ),
    "fold_change": (
        "change from step 0: paired log-ratio log(NMI final / NMI step 0) over seeds; every MoE "
        "condition but the reference routers (hash, domain) x layer"
    ),
    "minus_dense": (
        "MoE - dense held-out loss: every MoE condition with a dense twin x (domains, overall)"
    ),
    "contrast_loss": (
        "direct contrasts of held-out loss: every pair of conditions except an MoE condition and "
        "its dense twin x (domains, overall)"
    ),
    "contrast_nmi_change": (
        "direct contrasts of the NMI change from step 0: every pair of learned-router MoE "
        "conditions except the primary pair x layer"
    ),
    "knockout_own": (
        "knock-out: removing a domain's preferred expert minus removing a load-matched control, "
        "on that domain's own held-out loss, over seeds; every MoE condition but the reference "
        "routers (hash, domain) x layer x domain"
    ),
}
NAN = float("nan")


@dataclass(frozen=True)
class SummaryRow:
    """One group (or contrast ``"A - B"``, or initial model ``"step 0: ..."``) x layer x metric.
    layer: the MoE layer or None. n: runs (or seed pairs) with a value; mean, ci_low, ci_high:
    NaN where undefined; method: ``t``, ``paired_t``, ``welch_t``, ``log_t`` (geometric-mean
    fold change), ``ratio_of_means``, ``none`` (n <= 1) or ``count``; p, p_holm: two-sided p
    against 0 (``log_t``: against a fold change of 1) and its Holm adjustment in ``family``
    (NaN and "" on rows that test nothing); detectable: the effect the test detects with
    :data:`POWER` power at ALPHA / m; seeds, values: the per-seed values in seed order (NaN
    where a run lacks one; empty for Welch rows)."""

    group: str
    layer: int | None
    metric: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    method: str
    p: float = NAN
    p_holm: float = NAN
    family: str = ""
    detectable: float = NAN
    seeds: tuple[int | None, ...] = ()
    values: tuple[float, ...] = ()

    @classmethod
    def of(
        cls,
        group: str,
        layer: int | None,
        metric: str,
        interval: Interval,
        seeds: Sequence[int | None] = (),
        values: Sequence[float] = (),
        family: str = "",
    ) -> SummaryRow:
        """A row of ``interval``; its p kept only when it is in a ``family`` (a test)."""
        i = interval
        values = tuple(float(v) for v in values)
        p = i.p if family else NAN
        return cls(
            group,
            layer,
            metric,
            i.n,
            i.mean,
            i.ci_low,
            i.ci_high,
            i.method,
            p,
            NAN,
            family,
            NAN,
            tuple(seeds),
            values,
        )


@dataclass(frozen=True)
class GroupInfo:
    """One group: its runs' names, seeds, final steps and whether each has a step-0 checkpoint
    (in run order), whether it is MoE, and its dense twin's group (None when it has none)."""

    runs: list[str]
    seeds: list[int | None]
    moe: bool
    final_steps: list[int]
    dense_twin: str | None
    has_step0: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class InitialModel:
    """The step 0 that one or more groups share: the groups (by name), and the one run per
    distinct initial model its rows rest on (names and seeds, in seed order); reference: all
    its groups are reference routers (no step-0 counts: nothing to test)."""

    groups: list[str]
    runs: list[str]
    seeds: list[int | None]
    reference: bool = False


Test = tuple[str, "int | None", str, "int | None"]  # (group, layer, metric, seed or None)


@dataclass(frozen=True)
class Family:
    """One Holm family, declared once: its name (the rows' ``family``), what it holds, m (its
    tests with a p), each test and the survivors (p_holm < ALPHA) as (group, layer, metric,
    seed: the run's seed for per-run permutation tests, else None), the smallest raw p, Holm's
    first threshold ALPHA / m, and the smallest p a permutation test can give, 1 / (1 + K)
    (NaN for t-tests, or K unknown). The power of a family of seed-level t-tests: n_seeds (the
    fewest seeds behind a test), pooled_sd (the root mean square of the tests' seed-to-seed SDs,
    of the log-ratios for fold changes) and detectable (the effect detected with POWER power at
    ALPHA / m at those; a fold change for fold changes); 0 and NaN for other families."""

    name: str
    title: str
    m: int
    tests: tuple[Test, ...]
    survivors: tuple[Test, ...]
    smallest_p: float
    threshold: float
    resolution: float = NAN
    n_seeds: int = 0
    pooled_sd: float = NAN
    detectable: float = NAN


@dataclass(frozen=True)
class Summary:
    """The rows (the primary contrasts; then groups in name order, each: layers, then losses,
    then MoE - dense; then the step-0 initial models; then the direct contrasts), the groups,
    the contrasts and primary pairs (``"A - B"`` -> (A, B)), the initial models (label ->
    :class:`InitialModel`), the Holm families, and the warnings (one sentence each)."""

    rows: list[SummaryRow]
    groups: dict[str, GroupInfo]
    warnings: list[str] = field(default_factory=list)
    contrasts: dict[str, tuple[str, str]] = field(default_factory=dict)
    primary: dict[str, tuple[str, str]] = field(default_factory=dict)
    initial_models: dict[str, InitialModel] = field(default_factory=dict)
    families: list[Family] = field(default_factory=list)

    def row(self, group: str, metric: str, layer: int | None = None) -> SummaryRow | None:
        """The row of ``group`` (or contrast / initial-model label) x ``layer`` x ``metric``,
        or None."""
        return self._index.get((group, layer, metric))

    @functools.cached_property
    def _index(self) -> dict[tuple[str, int | None, str], SummaryRow]:
        """(group, layer, metric) -> its first row."""
        index: dict[tuple[str, int | None, str], SummaryRow] = {}
        for r in self.rows:
            index.setdefault((r.group, r.layer, r.metric), r)
        return index

    def family(self, name: str) -> Family | None:
        return next((f for f in self.families if f.name == name), None)
