"""``python -m moe_emergence.inspect CKPT (--text STRING | --file PATH) [--html OUT]``: which
expert each token goes to, per MoE layer (see :mod:`moe_emergence.analysis.inspect`)."""

import sys

from moe_emergence.analysis.arguments import parse_inspect_args


def main() -> int:
    """Parse first (``--help`` and usage errors answer before torch loads), then run."""
    args = parse_inspect_args()
    from moe_emergence.analysis.inspect import main as run

    return run(parsed=args)


if __name__ == "__main__":
    sys.exit(main())
