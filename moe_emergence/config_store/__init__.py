"""The groups' base nodes (``data/settings``, ``model/settings``,
``callbacks/routing_analysis/settings``) and the resolvers, registered in Hydra's config store
when this package is imported.

``conf/config.yaml`` names this package in ``hydra.searchpath``
(``pkg://moe_emergence.config_store``, a package that holds no config file): Hydra imports it as
it composes ``conf/``, so ``train.py``, :func:`moe_emergence.config.compose_config` and Hydra's
own compose API (``hydra.initialize_config_dir`` + ``compose``, as in a notebook) all find the
nodes, after ``import moe_emergence`` or without it. ``import moe_emergence`` itself registers
nothing and stays light: the nodes are built from the settings classes, whose packages bring
torch, transformers and Lightning. (A ``structured://`` search path entry would do the import
too, but it serves the whole config store, Hydra's own ``hydra/config`` schema included, as
configs, which Hydra refuses.)
"""

from __future__ import annotations

from moe_emergence.config import register_resolvers

register_resolvers()
