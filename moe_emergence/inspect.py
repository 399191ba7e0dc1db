"""``python -m moe_emergence.inspect CKPT (--text STRING | --file PATH) [--html OUT]``: which
expert each token goes to, per MoE layer (see :mod:`moe_emergence.analysis.inspect`)."""

import sys

from moe_emergence.analysis.inspect import main

if __name__ == "__main__":
    sys.exit(main())
