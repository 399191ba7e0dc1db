"""A run and its folder, one module per job (each imported on first use):

- :mod:`.checkpoint`: which checkpoint ``ckpt_path`` / ``init_from`` names, verified and read
  once;
- :mod:`.start`: how a start begins (:class:`RunStart`, read once: a new run, a resume, a new
  run from weights) and the checks that may refuse a resume;
- :mod:`.resume_settings`: what a resume may change (the settings check of ``ckpt_path``);
- :mod:`.history`: which starts a folder's checkpoints went through (one history per folder);
- :mod:`.folder`: the run folder's guard and checks, and its ``summary.json``;
- :mod:`.unique_dir`: the ``${unique_dir:...}`` resolver naming new run folders;
- :mod:`.record`: what the run's ``.hydra/`` records, read once (:class:`RunRecord`);
- :mod:`.find`: the runs ``analyze`` measures and their checkpoints.

The checkpoint file format itself is :mod:`moe_emergence.checkpoints`.
"""

from moe_emergence.lazy import lazy_exports

# name -> the module that defines it, imported on first use (moe_emergence.lazy)
_EXPORTS = {
    "Checkpoint": "moe_emergence.runs.checkpoint",
    "RunCheckpoints": "moe_emergence.runs.find",
    "RunFolderGuard": "moe_emergence.runs.folder",
    "RunRecord": "moe_emergence.runs.record",
    "RunStart": "moe_emergence.runs.start",
    "RunSummary": "moe_emergence.runs.folder",
    "SUMMARY_FILE": "moe_emergence.runs.folder",
    "StartRecord": "moe_emergence.runs.history",
    "check_no_rewind": "moe_emergence.runs.history",
    "check_one_history": "moe_emergence.runs.history",
    "check_resume_data": "moe_emergence.runs.start",
    "check_resume_settings": "moe_emergence.runs.resume_settings",
    "check_run_folder": "moe_emergence.runs.folder",
    "checkpoint_run_dir": "moe_emergence.runs.find",
    "continue_csv_history": "moe_emergence.runs.start",
    "find_runs": "moe_emergence.runs.find",
    "last_of_run": "moe_emergence.runs.checkpoint",
    "open_checkpoint": "moe_emergence.runs.checkpoint",
    "read_history": "moe_emergence.runs.history",
    "read_record": "moe_emergence.runs.record",
    "recorded_config": "moe_emergence.runs.record",
    "remove_partial_writes": "moe_emergence.runs.folder",
    "resolve_checkpoint": "moe_emergence.runs.checkpoint",
    "run_overrides": "moe_emergence.runs.record",
    "split_override": "moe_emergence.runs.record",
    "start_or_put_back": "moe_emergence.runs.folder",
    "trainer_settings": "moe_emergence.runs.resume_settings",
    "verify_checkpoints": "moe_emergence.runs.find",
}

__all__ = [
    "SUMMARY_FILE",
    "Checkpoint",
    "RunCheckpoints",
    "RunFolderGuard",
    "RunRecord",
    "RunStart",
    "RunSummary",
    "StartRecord",
    "check_no_rewind",
    "check_one_history",
    "check_resume_data",
    "check_resume_settings",
    "check_run_folder",
    "checkpoint_run_dir",
    "continue_csv_history",
    "find_runs",
    "last_of_run",
    "open_checkpoint",
    "read_history",
    "read_record",
    "recorded_config",
    "remove_partial_writes",
    "resolve_checkpoint",
    "run_overrides",
    "split_override",
    "start_or_put_back",
    "trainer_settings",
    "verify_checkpoints",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
