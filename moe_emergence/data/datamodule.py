"""MixedDomainDataModule: the packed multi-domain dataset as a LightningDataModule.

``prepare_data`` streams and tokenizes into the token cache (once per node, keeps no state);
``setup`` opens the cache, splits off the held-out texts, packs, balances and shuffles (every
rank, cheap, safe to call twice); ``train_dataloader`` yields ``collate_packed`` batches of
``batch_size`` blocks per device, in a new order every epoch (:class:`EpochShuffleSampler`).
``val_dataloader`` exists only when ``eval_fraction > 0``; under DDP each rank validates a
disjoint share of the held-out blocks, each block exactly once. A resume must keep what
decides the batches (batch size, world size, seed, balance, block size, the data's content and
held-out split): the train loader's saved state carries them and refuses a change
(:mod:`moe_emergence.data.loader`). Loaders draw their workers' seeds from their own generator,
never from torch's global one, so the model's random stream does not depend on when they start.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from moe_emergence.data.cache import MANIFEST, cached_tokenizer_infos
from moe_emergence.data.dataset import PackedMixedDomainDataset, collate_packed
from moe_emergence.data.loader import EpochShuffleSampler, ResumableDataLoader
from moe_emergence.data.prepare import PreparedDomains, load_data_tokenizer, prepare_domains
from moe_emergence.data.report import build_report, report_table, write_report
from moe_emergence.data.settings import (
    DataSettings,
    LoaderSettings,
    naming_options,
    option,
    split_fields,
)
from moe_emergence.data.split import split_by_document
from moe_emergence.data.tokenize import TokenStream, offsets_from_lengths
from moe_emergence.errors import UserError
from moe_emergence.hub import HubUnavailableError, default_mirror

log = logging.getLogger(__name__)

REPORT_FILE = "data_report.json"


def _naming_options(method: Callable) -> Callable:
    """``method`` with its SettingErrors naming the flag and config key (see naming_options)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with naming_options():
            return method(*args, **kwargs)

    return wrapper


def data_fingerprint(
    manifest: Mapping[str, Any], eval_fraction: float, eval_seed: int, eval_min_texts: int | None
) -> str:
    """16 hex digits naming a run's training data: the token and offset checksums of every
    domain in the token cache ``manifest``, and the held-out split (its seed and minimum only
    where ``eval_fraction`` > 0); what a checkpoint's train loader records. ``eval_min_texts``
    None: the form of the code before that setting (632c0ac), which its runs recorded."""
    tokens = {d: [e["tokens_sha256"], e["offsets_sha256"]] for d, e in manifest["domains"].items()}
    held_out = eval_fraction > 0
    split = [eval_fraction, *((eval_seed, eval_min_texts) if held_out else ())]
    if eval_min_texts is None:  # before data.eval_min_texts
        split = [eval_fraction, eval_seed if held_out else None]
    blob = json.dumps({"tokens": tokens, "held_out": split}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class MixedDomainDataModule(L.LightningDataModule):
    """Code, math and prose blocks of ``block_size`` tokens with their domain labels.

    ``batch_size`` is per device (per DDP rank): the global batch is
    ``batch_size * devices * num_nodes``. ``hub_mirror=None`` falls back to ``$MOE_HUB_MIRROR``.
    ``eval_fraction`` of each domain's texts (chosen with ``eval_seed``, fixed across ``seed``
    sweeps) is held out whole for validation and never balanced. ``report_dir`` (default: the
    trainer's ``default_root_dir``) receives ``data_report.json``.

    After ``setup``: ``train_dataset`` (the blocks the train loader serves, trimmed to a
    multiple of the world size), ``train_packed`` (the packed training dataset before that
    trimming: its ``domain_blocks`` and ``kept_block_indices`` let a callback draw a probe from
    the training data), ``val_dataset`` (the held-out blocks, or None) and ``eval_text_ids`` /
    ``train_text_ids`` (domain -> stream indices of its held-out / training texts, in the order
    of each side's stream: text j of ``val_dataset``'s domain stream is ``eval_text_ids[d][j]``).
    """

    def __init__(
        self,
        settings: DataSettings | None = None,
        loader: LoaderSettings | None = None,
        **fields: Any,
    ) -> None:
        """``settings`` / ``loader`` (defaults: the dataclasses' own), overridden by flat
        ``fields`` (the ``data.*`` keys Hydra passes: ``size_mb=1, batch_size=4, ...``);
        ``hub_mirror=None`` means ``$MOE_HUB_MIRROR``. Checked here, before any data is read."""
        super().__init__()
        data_fields, loader_fields = split_fields(fields)
        given_mirror = data_fields.get("hub_mirror", settings.hub_mirror if settings else None)
        self.settings = dataclasses.replace(settings or DataSettings(), **data_fields)
        if self.settings.hub_mirror is None:
            self.settings.hub_mirror = default_mirror()
        self.settings.validate()
        loader = dataclasses.replace(loader or LoaderSettings(), **loader_fields).validate()
        # The flat dict of every key, as given: checkpoints carry it, analyze rebuilds from it.
        self.save_hyperparameters(
            {**self.settings.to_dict(), "hub_mirror": given_mirror, **loader.to_dict()}
        )
        for key, value in loader.to_dict().items():  # self.batch_size, ...; three resolved:
            setattr(self, key, value)
        if self.pin_memory is None:
            self.pin_memory = torch.cuda.is_available()
        workers = self.num_workers > 0
        self.persistent_workers = (
            workers if self.persistent_workers is None else (self.persistent_workers and workers)
        )
        self.eval_fraction = float(self.eval_fraction)
        if self.eval_fraction == 0:
            # No held-out split: hide the hook so that Lightning runs no validation loop.
            self.val_dataloader = super().val_dataloader  # type: ignore[method-assign]
        self.train_dataset: Dataset | None = None
        self.train_packed: PackedMixedDomainDataset | None = None
        self.val_dataset: PackedMixedDomainDataset | None = None
        self.eval_text_ids: dict[str, np.ndarray] = {}
        self.train_text_ids: dict[str, np.ndarray] = {}
        self.report: dict[str, Any] | None = None
        self.data_fingerprint: str | None = None
        # Set by a reader of a run (analyze): offline, a token cache entry holding the data of
        # this fingerprint is taken before newer ones that match the settings as well.
        self.expected_fingerprint: str | None = None
        self._tokenizer = None

    @property
    @_naming_options
    def tokenizer(self):
        """The tokenizer the blocks were made with (loaded on first use)."""
        if self._tokenizer is None:
            s = self.settings
            self._tokenizer = load_data_tokenizer(s.tokenizer, s.hub_mirror, s.cache_dir)
        return self._tokenizer

    @property
    def domains(self) -> tuple[str, ...]:
        """The domain labels of the blocks, in the domain set's order (a model's domain
        index)."""
        return tuple(self.settings.domain_sources)

    @property
    @_naming_options
    def vocab_size(self) -> int:
        """Ids of the tokenizer the blocks are made with (what a model's embeddings need).
        Offline, where the tokenizer cannot be loaded (a Hub name, no mirror, not in the
        Hugging Face cache), the size the token cache's manifests record under its name, when
        they agree; else the loading error."""
        try:
            return len(self.tokenizer)
        except HubUnavailableError:
            s = self.settings
            sizes = {
                info["vocab_size"] for info in cached_tokenizer_infos(s.cache_dir, s.tokenizer)
            }
            if len(sizes) != 1:
                raise
            size = sizes.pop()
            log.info(
                "Offline: tokenizer '%s' has %d ids, as the token cache records.", s.tokenizer, size
            )
            return size

    @_naming_options
    def prepare_data(self) -> None:
        """Fill the token cache (streams and tokenizes only when it is missing)."""
        prepared = prepare_domains(
            self.settings, show_progress=self.show_progress, prefer=self._expected
        )
        log.info(report_table(prepared, self.settings.block_size))

    @_naming_options
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        prepared = prepare_domains(
            self.settings,
            show_progress=self.show_progress,
            announce_hit=False,
            prefer=self._expected,
        )
        train_streams: dict[str, Any] = dict(prepared.streams)
        eval_streams: dict[str, Any] = {}
        if self.eval_fraction > 0:
            train_streams, eval_streams = self._split(prepared.streams)
        s = self.settings
        dataset = PackedMixedDomainDataset.from_token_streams(
            train_streams, s.block_size, s.balance_tokens, s.seed
        )
        if eval_streams:
            try:
                self.val_dataset = PackedMixedDomainDataset.from_token_streams(
                    eval_streams,
                    s.block_size,
                    balance_tokens=False,
                    seed=s.seed,
                    warn_imbalance=False,
                )
            except ValueError as exc:
                raise UserError(
                    f"Held-out split too small: {exc} Raise {option('eval_fraction')} "
                    f"(now {self.eval_fraction}), {option('eval_min_texts')} (now "
                    f"{self.eval_min_texts}) or {option('size_mb')}."
                ) from None
        self.train_packed = dataset
        self.train_dataset = self._trim_for_ranks(dataset)
        self.data_fingerprint = self._fingerprint(prepared)
        self.report = self._report(prepared, dataset)
        self._write_report()

    def _fingerprint(self, prepared: PreparedDomains) -> str:
        """16 hex digits naming the training data's content: every domain's token and offset
        checksums from the cache manifest (not its path: a moved mirror or cache is the same
        data), and the held-out split (:func:`data_fingerprint`). Block size, seed and balance
        are checked on their own."""
        return self.fingerprint_of(json.loads((prepared.cache_path / MANIFEST).read_text()))

    def fingerprint_of(self, manifest: Mapping[str, Any]) -> str:
        """:meth:`_fingerprint` of the data a token cache ``manifest`` holds."""
        return data_fingerprint(manifest, self.eval_fraction, self.eval_seed, self.eval_min_texts)

    def _expected(self, manifest: Any) -> bool:
        """Whether a token cache ``manifest`` holds the data of ``expected_fingerprint``."""
        if self.expected_fingerprint is None:
            return False
        try:
            return self.fingerprint_of(manifest) == self.expected_fingerprint
        except (KeyError, TypeError, AttributeError):
            return False

    @_naming_options
    def resume_identity(self, world_size: int | None = None) -> dict[str, Any]:
        """What a resume must find unchanged (``RESUME_KEYS``). ``world_size``: default the
        attached trainer's. Before ``setup`` (a check ahead of ``fit``), the data fingerprint
        comes from opening the token cache (building it when missing, as ``fit`` would)."""
        if self.data_fingerprint is None:
            prepared = prepare_domains(
                self.settings, show_progress=self.show_progress, announce_hit=False
            )
            self.data_fingerprint = self._fingerprint(prepared)
        s = self.settings
        return {
            "batch_size": self.batch_size,
            "world_size": self._ranks()[0] if world_size is None else world_size,
            "seed": s.seed,
            "balance_tokens": s.balance_tokens,
            "block_size": s.block_size,
            "data_fingerprint": self.data_fingerprint,
        }

    def _split(self, streams: dict[str, TokenStream]) -> tuple[dict, dict]:
        """Per domain, the training and held-out streams (their own text offsets); fills
        ``eval_text_ids`` and ``train_text_ids`` (stream text index of each side's texts)."""
        train, held_out = {}, {}
        for domain, stream in streams.items():
            train_tokens, eval_tokens, is_eval = split_by_document(
                stream.tokens,
                stream.doc_offsets,
                self.eval_fraction,
                self.eval_seed,
                self.eval_min_texts or 0,  # None: no floor (runs made before it)
            )
            lengths = np.diff(stream.doc_offsets)
            train[domain] = TokenStream(train_tokens, offsets_from_lengths([lengths[~is_eval]]))
            held_out[domain] = TokenStream(eval_tokens, offsets_from_lengths([lengths[is_eval]]))
            self.eval_text_ids[domain] = np.flatnonzero(is_eval)
            self.train_text_ids[domain] = np.flatnonzero(~is_eval)
            held = len(self.eval_text_ids[domain])
            if held < (self.eval_min_texts or 0):
                log.warning(
                    "Domain '%s' holds out %d texts, fewer than %s=%d (it has %d; the floor takes "
                    "at most half, and exact duplicates stay on one side): the routing nulls and "
                    "probe intervals, which resample documents, have little resolution there. "
                    "Raise %s for more texts.",
                    domain,
                    held,
                    option("eval_min_texts"),
                    self.eval_min_texts,
                    stream.num_texts,
                    option("size_mb"),
                )
        return train, held_out

    def _ranks(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the attached trainer; ``(1, 0)`` without one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _trim_for_ranks(self, dataset: PackedMixedDomainDataset) -> Dataset:
        """Drop the last (< world size) blocks so that DDP ranks get equal, disjoint shares."""
        world = self._ranks()[0]
        extra = len(dataset) % world
        if not extra:
            return dataset
        log.info(
            "Dropping %d of %d blocks so that %d ranks get equal shares.",
            extra,
            len(dataset),
            world,
        )
        return Subset(dataset, range(len(dataset) - extra))

    def _report(
        self, prepared: PreparedDomains, dataset: PackedMixedDomainDataset
    ) -> dict[str, Any]:
        report = build_report(prepared, dataset, self.settings)
        report["eval_fraction"] = self.eval_fraction
        if self.val_dataset is not None:
            # token_counts / block_counts above describe the training side only.
            report["all_token_counts"] = {d: s.num_tokens for d, s in prepared.streams.items()}
            report["eval_seed"] = self.eval_seed
            report["eval_num_texts"] = {d: len(i) for d, i in self.eval_text_ids.items()}
            report["eval_token_counts"] = dict(self.val_dataset.token_counts)
            report["eval_block_counts"] = dict(self.val_dataset.block_counts)
        report["train_blocks_used"] = len(self.train_dataset)
        report["data_fingerprint"] = self.data_fingerprint
        return report

    def _write_report(self) -> None:
        trainer = self.trainer
        if trainer is not None and not trainer.is_global_zero:
            return
        folder = self.report_dir or (trainer.default_root_dir if trainer is not None else None)
        if folder is not None and self.report is not None:
            path = write_report(self.report, Path(folder) / REPORT_FILE)
            log.info("Data report written to %s", path)

    def _batches_done(self) -> int:
        """Batches of the current epoch the training loop has processed (0 without a trainer)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _checkpoint_path(self) -> str | None:
        """The checkpoint being resumed from (for messages), when the trainer has one."""
        ckpt = self.trainer.ckpt_path if self.trainer is not None else None
        return str(ckpt) if ckpt else None

    def _loader(
        self, dataset: Dataset, sampler: Sampler | None = None, resumable: bool = False
    ) -> DataLoader:
        kwargs = self._loader_kwargs(sampler)
        if resumable:
            return ResumableDataLoader(
                dataset,
                batches_done=self._batches_done,
                identity=self.resume_identity(),
                checkpoint=self._checkpoint_path,
                **kwargs,
            )
        return DataLoader(dataset, **kwargs)

    def _loader_kwargs(self, sampler: Sampler | None) -> dict[str, Any]:
        return dict(
            batch_size=self.batch_size,
            shuffle=False,  # the order comes from the sampler, else the dataset's own
            sampler=sampler,
            collate_fn=collate_packed,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            # Its own generator: starting an iterator draws the workers' base seed from it,
            # not from torch's global one, so that the model's random stream (router noise,
            # dropout) does not depend on when loaders start (epochs, validation, a resume).
            generator=torch.Generator().manual_seed(self.settings.seed),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("Call setup('fit') before train_dataloader().")
        world, rank = self._ranks()
        sampler = EpochShuffleSampler(self.train_dataset, self.settings.seed, world, rank)
        return self._loader(self.train_dataset, sampler, resumable=True)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out blocks in dataset order; under DDP each rank gets ``blocks[rank::world]``
        (shares differ by at most one block; no block is repeated to even them out). Without a
        held-out split, no loader (``[]``: Lightning runs no validation, also in processes
        started by ddp_spawn, where the hidden hook comes back)."""
        if self.eval_fraction == 0:
            return []
        if self.val_dataset is None:
            raise RuntimeError("Call setup('fit') before val_dataloader().")
        world, rank = self._ranks()
        if world == 1:
            return self._loader(self.val_dataset)
        if len(self.val_dataset) < world:
            raise UserError(
                f"The held-out split has {len(self.val_dataset)} blocks, fewer than the {world} "
                f"ranks: raise {option('eval_fraction')} (now {self.eval_fraction}) or "
                f"{option('size_mb')}."
            )
        sampler = UnrepeatedDistributedSampler(
            self.val_dataset, num_replicas=world, rank=rank, shuffle=False
        )
        return self._loader(self.val_dataset, sampler)


__all__ = ["MixedDomainDataModule"]
