"""Run folders that are never shared: the ``${unique_dir:...}`` resolver of ``hydra.run.dir``.

``${unique_dir:<base>}`` claims ``<base>`` by creating it with ``os.mkdir`` (atomic, also on
NFS): when another process holds it (two runs started in the same second), it tries
``<base>_1``, ``<base>_2``, ... and returns the first one it created. The answer is kept per
process and in OmegaConf's resolver cache, so resolving the same ``hydra.run.dir`` again
(Hydra, Lightning's ddp re-launch, which passes the resolved folder on to the other ranks)
gives the same folder. Ranks started by an outside launcher (torchrun, ``srun`` with several
tasks) cannot agree on a claimed name: there the folder is ``<base>`` plus the SLURM job id
when there is one (the behaviour before this resolver, made safer), and every rank shares it.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

RESOLVER = "unique_dir"
MAX_TRIES = 10_000
_claimed: dict[str, str] = {}


def _outside_launcher_ranks() -> bool:
    """Whether this process is one of several ranks that torchrun or SLURM started."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def unique_dir(base: str) -> str:
    """A folder ``base`` or ``base_<n>`` that this process created (see the module doc)."""
    if base in _claimed:
        return _claimed[base]
    if _outside_launcher_ranks():
        job = os.environ.get("SLURM_JOB_ID")
        chosen = f"{base}_job{job}" if job else base
    else:
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        for n in range(MAX_TRIES):
            candidate = base if n == 0 else f"{base}_{n}"
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            chosen = candidate
            break
        else:
            raise RuntimeError(f"{MAX_TRIES} run folders named {base}_<n> exist already.")
    _claimed[base] = chosen
    return chosen


def register() -> None:
    """Register ``${unique_dir:...}`` (idempotent); ``config.register_resolvers`` should call
    this."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, unique_dir, use_cache=True)


__all__ = ["register", "unique_dir"]
