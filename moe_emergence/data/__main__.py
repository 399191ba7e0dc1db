"""``python -m moe_emergence.data``: see :mod:`moe_emergence.data.cli`."""

import sys

from moe_emergence.data.cli import main

sys.exit(main())
