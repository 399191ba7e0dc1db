"""EpochShuffleSampler and the datamodule's loaders under (fake) DDP ranks, no processes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from helpers.data import tiny_datamodule_kwargs
from torch.utils.data import DistributedSampler

from moe_emergence.data import MixedDomainDataModule
from moe_emergence.data.loader import EpochShuffleSampler


def order(sampler: EpochShuffleSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_epoch_zero_is_the_datasets_order_later_epochs_differ():
    sampler = EpochShuffleSampler(range(50), seed=7)
    epochs = [order(sampler, e) for e in range(4)]
    assert epochs[0] == list(range(50))
    assert epochs[1] != epochs[0] and epochs[2] != epochs[1] and epochs[3] != epochs[2]
    for e in epochs:  # every index exactly once per epoch
        assert sorted(e) == list(range(50))
    assert epochs[1] == np.random.default_rng([7, 1]).permutation(50).tolist()


def test_same_seed_and_epoch_same_order_other_seed_other_order():
    a, b = EpochShuffleSampler(range(50), seed=7), EpochShuffleSampler(range(50), seed=7)
    for epoch in (1, 2, 5):
        assert order(a, epoch) == order(b, epoch)
    assert order(a, 1) != order(EpochShuffleSampler(range(50), seed=8), 1)
    assert order(a, 0) == order(EpochShuffleSampler(range(50), seed=8), 0)


@pytest.mark.parametrize("n", [50, 51])
def test_two_replicas_shard_like_distributed_sampler(n):
    ranks = [EpochShuffleSampler(range(n), seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    whole = EpochShuffleSampler(range(n), seed=3)
    for epoch in (0, 1, 2):
        full = order(whole, epoch)
        shards = [order(s, epoch) for s in ranks]
        assert shards[0] == full[0::2][: len(shards[0])] and len(shards[0]) == len(shards[1])
        if n % 2 == 0:  # the datamodule's case: disjoint shares covering the order
            assert set(shards[0]).isdisjoint(shards[1])
            assert sorted(shards[0] + shards[1]) == list(range(n))
            assert shards[1] == full[1::2]
    # epoch 0 is exactly torch's unshuffled DistributedSampler (padding included)
    for r, sampler in enumerate(ranks):
        torch_sampler = DistributedSampler(range(n), num_replicas=2, rank=r, shuffle=False)
        assert order(sampler, 0) == list(torch_sampler)


def fake_trainer(world: int, rank: int, root) -> SimpleNamespace:
    return SimpleNamespace(
        world_size=world, global_rank=rank, is_global_zero=rank == 0, default_root_dir=str(root)
    )


@pytest.fixture
def held_out_dm(tiny_mirror, tiny_tokenizer_dir, tmp_path):
    dm = MixedDomainDataModule(
        **tiny_datamodule_kwargs(
            tiny_mirror,
            tiny_tokenizer_dir,
            tmp_path / "cache",
            64,
            batch_size=4,
            eval_fraction=0.2,
            eval_min_texts=0,
        )
    )
    dm.trainer = fake_trainer(2, 0, tmp_path)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("world", [2, 3])
def test_validation_sees_every_held_out_block_once_across_ranks(held_out_dm, world, tmp_path):
    n = len(held_out_dm.val_dataset)
    assert n % world != 0  # where a padded DistributedSampler would repeat blocks
    shares = []
    for rank in range(world):
        held_out_dm.trainer = fake_trainer(world, rank, tmp_path)
        loader = held_out_dm.val_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # Lightning keeps it as it is
        shares.append(list(loader.sampler))
        assert sum(len(b["input_ids"]) for b in loader) == len(shares[-1])
    everything = [i for share in shares for i in share]
    assert sorted(everything) == list(range(n))  # disjoint, no duplicates, union = all
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_validation_on_one_device_is_the_plain_held_out_order(held_out_dm, tmp_path):
    held_out_dm.trainer = fake_trainer(1, 0, tmp_path)
    loader = held_out_dm.val_dataloader()
    assert list(loader.sampler) == list(range(len(held_out_dm.val_dataset)))


def test_train_loader_shards_a_new_order_every_epoch(held_out_dm, tmp_path):
    n = len(held_out_dm.train_dataset)
    assert n % 2 == 0  # trimmed for two ranks
    epochs = []
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            held_out_dm.trainer = fake_trainer(2, rank, tmp_path)
            sampler = held_out_dm.train_dataloader().sampler
            assert isinstance(sampler, EpochShuffleSampler) and sampler.seed == 42
            shards.append(order(sampler, epoch))
        assert set(shards[0]).isdisjoint(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(n))
        epochs.append(shards)
    assert epochs[0][0] == list(range(0, n, 2))  # epoch 0: the dataset's order, as before
    assert epochs[1][0] != epochs[0][0]


def test_train_packed_is_the_untrimmed_training_dataset(held_out_dm):
    packed, served = held_out_dm.train_packed, held_out_dm.train_dataset
    assert packed is not None and len(served) <= len(packed)
    assert all(
        served[i]["input_ids"].tolist() == packed[i]["input_ids"].tolist()
        for i in range(len(served))
    )
    for domain in packed.domains:
        kept = packed.kept_block_indices(domain)
        assert kept.tolist() == list(range(packed.block_counts[domain]))


def test_too_few_held_out_blocks_for_the_ranks_is_a_clear_error(held_out_dm, tmp_path):
    held_out_dm.trainer = fake_trainer(len(held_out_dm.val_dataset) + 1, 0, tmp_path)
    with pytest.raises(ValueError, match=r"fewer than the \d+ ranks.*eval_fraction"):
        held_out_dm.val_dataloader()
