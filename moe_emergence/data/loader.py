"""The training loader that a resume can trust, and its sampler.

:class:`ResumableDataLoader` saves a versioned state (format version, epoch, batches done, and
the settings that decide the batches: :data:`RESUME_KEYS`) and refuses to restore one of another
version or identity (:func:`check_loader_state`, one line naming every change).
:class:`EpochShuffleSampler` gives a new block order every epoch, the same for the same seed and
epoch, sharded by rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sized
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

from moe_emergence.data.settings import config_key
from moe_emergence.errors import UserError

LOADER_STATE_VERSION = 2

# The data settings a resume must find unchanged that the config alone decides (data.<key>).
SETTING_KEYS = ("batch_size", "seed", "balance_tokens", "block_size")
# What a resume must find unchanged (loader-state key -> what the user sets).
RESUME_KEYS = {
    **{key: config_key(key) for key in SETTING_KEYS},
    "world_size": "world size (trainer.devices x trainer.num_nodes)",
    "data_fingerprint": f"the training data (its tokens: {config_key('size_mb')}, sources, "
    f"tokenizer, max_example_chars; {config_key('eval_fraction')}, {config_key('eval_seed')})",
}


def _shown(key: str, value: Any) -> str:
    return str(value)[:12] if key == "data_fingerprint" and value is not None else repr(value)


def check_loader_state(
    state: Mapping[str, Any], identity: Mapping[str, Any], checkpoint: Any = None
) -> None:
    """Refuse (one-line :class:`UserError`) a saved train-loader ``state`` of another format
    version, or whose settings differ from ``identity`` (see ``RESUME_KEYS``): every changed
    setting with both values, and how to start a new run from ``checkpoint``'s weights."""
    fresh = (
        f"start a new run from the checkpoint's weights with "
        f"init_from={checkpoint or '<checkpoint>'} (and ckpt_path=null; it gets a new run folder)"
    )
    version = state.get("version")
    if version != LOADER_STATE_VERSION:
        what = (
            "has no format version (saved before resumes were checked), so its data "
            "settings cannot be verified"
            if version is None
            else f"has format {version!r}, this code reads {LOADER_STATE_VERSION}"
        )
        raise UserError(f"Cannot resume: the checkpoint's data-loader state {what}; {fresh}.")
    changed = [
        f"{RESUME_KEYS.get(key, key)}: checkpoint {_shown(key, state.get(key))}, "
        f"now {_shown(key, now)}"
        for key, now in identity.items()
        if state.get(key) != now
    ]
    if changed:
        raise UserError(
            f"Cannot resume with changed settings: {'; '.join(changed)}. Resume with the "
            f"checkpoint's values, or {fresh}."
        )


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning can resume mid-epoch, and only with unchanged data settings.

    ``state_dict`` records the format version, the sampler's epoch and how many batches of it
    the training loop has processed (``batches_done()``, asked of the trainer; a finished
    epoch is saved as the next epoch with none done), plus ``identity``: the settings that
    decide which blocks come in which batches (see ``RESUME_KEYS``). ``load_state_dict``
    refuses (one-line :class:`UserError`) a state of another format or identity, naming each
    changed setting and how to start a new run from the checkpoint's weights (``checkpoint()``
    names the file); else it puts the sampler at that epoch (when it has ``set_epoch``) and
    makes the next iteration skip that many batches, so a restored run sees the same batches
    as an uninterrupted one. Skipping reads the skipped blocks but runs no model. The epoch
    must be set here: on a resume Lightning starts the loader's iterator (and its sampler's
    order) before its fit loop calls ``set_epoch``.
    """

    def __init__(
        self,
        *args: Any,
        batches_done: Callable[[], int] | None = None,
        identity: Mapping[str, Any] | None = None,
        checkpoint: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done
        self.identity = dict(identity or {})
        self.checkpoint = checkpoint
        self._skip = 0

    def state_dict(self) -> dict[str, Any]:
        done = int(self.batches_done()) if self.batches_done is not None else 0
        epoch = int(getattr(self.sampler, "epoch", 0))
        if done >= len(self):  # the epoch is over: resume at the start of the next one
            epoch, done = epoch + 1, 0
        return {
            "version": LOADER_STATE_VERSION,
            "epoch": epoch,
            "batches_done": done,
            **self.identity,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_resume(state)
        self._skip = int(state["batches_done"])
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(int(state["epoch"]))

    def check_resume(self, state: Mapping[str, Any]) -> None:
        """Raise a one-line UserError when ``state`` is of another format or another identity."""
        checkpoint = self.checkpoint() if self.checkpoint is not None else None
        check_loader_state(state, self.identity, checkpoint)

    def __iter__(self):
        iterator = super().__iter__()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(iterator, None)
        return iterator


class EpochShuffleSampler(DistributedSampler):
    """A new block order every epoch, the same for the same ``(seed, epoch)``, sharded by rank.

    Epoch 0 keeps the dataset's own order (identity: the dataset is already shuffled with the
    seed); epoch ``e >= 1`` uses ``np.random.default_rng([seed, e]).permutation(len(dataset))``.
    Rank r of R gets ``order[r::R]``, exactly as ``DistributedSampler(shuffle=False,
    drop_last=False)`` shards its order (padded at the end with the order's first indices up to
    a multiple of R; the datamodule trims the dataset to such a multiple, so nothing repeats).
    Being a ``DistributedSampler``, Lightning neither replaces it under DDP nor skips its
    ``set_epoch``, which the fit loop calls before every epoch, resumed ones included.
    """

    def __init__(self, dataset: Sized, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle=False, seed=seed, drop_last=False)

    def epoch_order(self) -> np.ndarray:
        """The whole order of the current epoch (int64 ``[len(dataset)]``, every index once)."""
        n = len(self.dataset)
        if self.epoch == 0:
            return np.arange(n, dtype=np.int64)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        if self.total_size > len(order):  # repeat from the start, as torch pads
            order = np.resize(order, self.total_size)
        return iter(order[self.rank : self.total_size : self.num_replicas].tolist())
