"""``python -m moe_emergence.analyze PATH [--out DIR]``: every checkpoint of a run or a seed
sweep routed and scored in eval mode, summarised per condition over seeds with 95% intervals
(see :mod:`moe_emergence.analysis.analyze`); ``--model MODEL --domain-set SET``: a Hugging Face
MoE measured the same way (:mod:`moe_emergence.analysis.external`)."""

import sys

from moe_emergence.analysis.arguments import parse_analyze_args


def main() -> int:
    """Parse first (``--help`` and usage errors answer before torch loads), then run."""
    args = parse_analyze_args()
    from moe_emergence.analysis.analyze import main as run

    return run(parsed=args)


if __name__ == "__main__":
    sys.exit(main())
