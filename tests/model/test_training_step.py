"""The training step reads nothing back to the host except at logging steps: the per-domain
losses it logs and keeps, and the routing window counts, are those of the earlier per-step
code (computed here the old way from the same forwards), the grouped path makes no host
conversion, and the next-token loss is computed in chunks with the values of one pass."""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from collections import deque

import lightning as L
import pytest
import torch
from helpers.configs import tiny_overrides
from helpers.moe import tiny_module
from omegaconf import open_dict

from moe_emergence.analysis.callback import RoutingAnalysis
from moe_emergence.analysis.tables import read_table
from moe_emergence.config import compose_config
from moe_emergence.errors import UserError
from moe_emergence.model.gpt2_moe import _chunk_losses, next_token_losses
from moe_emergence.model.module import MoEGPT2Module, RecentDomainLosses, check_compile
from moe_emergence.model.moe import cutlass_grouped_mm
from moe_emergence.train import train

DOMAINS = ("code", "math", "prose")  # the default domain set (conf/data/domains)

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Make every conversion of a tensor to host values (and ``torch.bincount``, whose output
    size is read from the device on CUDA) raise: on CUDA each would be a host sync."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    bincount = torch.bincount

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"host read in a training step: Tensor.{name}")

        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        torch.bincount = refuse("bincount")
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
        torch.bincount = bincount


class Recorder:
    """Per training step (optimizer step = micro-batch here): global step, per-block losses,
    domain ids, and each MoE layer's indices; filled by a wrapper of ``_losses``."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, torch.Tensor, torch.Tensor, dict]] = []


class Clock:
    """``perf_counter`` for the module: real time plus the time callbacks "spent"."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.skipped


CLOCK = Clock()


class SlowCallback(L.Callback):
    """On the module's clock: 10 s in every step between backward and the optimizer (part of
    the step), and 100 s after every training batch, as a long validation or routing analysis
    would (not part of it)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        CLOCK.skipped += 10.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        CLOCK.skipped += 100.0


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_step_values_equal_the_per_step_code_and_are_read_only_at_logging_steps(
    tiny_mirror, tiny_tokenizer_dir, tmp_path, monkeypatch, dispatch
):
    """Both paths log and keep what the per-step code computed from the same forwards; the
    grouped path's steps (the loop reads its per-expert counts by design) read nothing on the
    host outside logging steps."""
    record = Recorder()
    losses = MoEGPT2Module._losses
    step = MoEGPT2Module.training_step
    count = RoutingAnalysis._count_training_batch

    def recorded_losses(self, batch):
        per_block, domain_ids, aux = losses(self, batch)
        if self.training:
            indices = {i: idx.clone() for i, (idx, _) in aux.routing.items()}
            record.steps.append(
                (self.global_step, per_block.detach().clone(), domain_ids.clone(), indices)
            )
        return per_block, domain_ids, aux

    def guarded_step(self, batch, batch_idx):
        logging = self._is_logging_step() or dispatch == "loop"
        with contextlib.nullcontext() if logging else no_host_reads():
            return step(self, batch, batch_idx)

    def guarded_count(self, pl_module, batch):
        logging = pl_module._is_logging_step() or dispatch == "loop"
        with contextlib.nullcontext() if logging else no_host_reads():
            return count(self, pl_module, batch)

    monkeypatch.setattr("moe_emergence.model.module.time", CLOCK)
    monkeypatch.setattr(MoEGPT2Module, "_losses", recorded_losses)
    monkeypatch.setattr(MoEGPT2Module, "training_step", guarded_step)
    monkeypatch.setattr(RoutingAnalysis, "_count_training_batch", guarded_count)
    cfg = compose_config(
        tiny_overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            tmp_path,
            "trainer.max_steps=7",
            "trainer.log_every_n_steps=3",
            "callbacks.routing_analysis.every_n_steps=4",
            f"model.moe.dispatch={dispatch}",
            "data.batch_size=6",
        )
    )
    with open_dict(cfg):
        cfg.callbacks.slow = {"_target_": f"{__name__}.SlowCallback"}
    out = train(cfg)
    assert [s for s, *_ in record.steps] == list(range(7))
    assert out["moe_dispatch"] == dispatch

    # Per-domain losses: logged at logging steps only (steps 2 and 5), each the mean of the
    # domain's blocks in that step, as the per-step code computed it.
    metrics = read_table(tmp_path / "csv" / "metrics.csv")
    logged = {
        (int(r["step"]), d): float(r[f"train/loss_{d}"])
        for r in metrics
        for d in DOMAINS
        if r.get(f"train/loss_{d}")
    }
    expected = {}
    for s, per_block, domain_ids, _ in record.steps:
        for d, domain in enumerate(DOMAINS):
            mask = domain_ids == d
            if (s + 1) % 3 == 0:  # nan where the step has no block of the domain
                expected[s, domain] = float(per_block[mask].mean()) if mask.any() else "nan"
    logged = {key: "nan" if math.isnan(value) else value for key, value in logged.items()}
    assert logged == expected and {s for s, _ in logged} == {2, 5}
    assert "nan" in expected.values()  # the case where Lightning repeated a stale value
    throughput = [float(r["train/tokens_per_s"]) for r in metrics if r.get("train/tokens_per_s")]
    assert {int(r["step"]) for r in metrics if r.get("train/tokens_per_s")} == {2, 5}
    # 192 tokens a step in 10 s + the step's own time: below 19.2 tokens/s. Without the 10 s
    # (the optimizer part left out) it would be hundreds; with the 100 s after the batch, < 2.
    assert all(10 < tokens_per_s < 19.2 for tokens_per_s in throughput)

    # The kept losses: per domain, the last 50 steps in which it appeared (the old deque).
    recent = {d: deque(maxlen=50) for d in DOMAINS}
    for _, per_block, domain_ids, _ in record.steps:
        for d, domain in enumerate(DOMAINS):
            mask = domain_ids == d
            if mask.any():
                recent[domain].append((float(per_block[mask].sum()), int(mask.sum())))
    old = {d: sum(s for s, _ in v) / sum(n for _, n in v) for d, v in recent.items() if v}
    assert out["domain_losses"] == pytest.approx(old, rel=1e-6)

    # Training-window routing counts: the old per-step bincount of (domain, expert).
    windows = read_table(tmp_path / "routing" / "train_window_counts.csv")
    for start, end in ((0, 4), (4, 7)):
        for layer in (2, 3):
            reference = torch.zeros(len(DOMAINS) * 4, dtype=torch.long)
            for s, _, domain_ids, indices in record.steps:
                if start <= s < end:
                    tokens = domain_ids.repeat_interleave(32)
                    reference += torch.bincount(tokens * 4 + indices[layer][:, 0], minlength=12)
            got = {
                (r["domain"], int(r["expert"])): int(r["assignments"])
                for r in windows
                if (r["step_start"], r["step_end"], r["layer"])
                == (str(start), str(end), str(layer))
            }
            assert got == {
                (domain, e): int(reference[d * 4 + e])
                for d, domain in enumerate(DOMAINS)
                for e in range(4)
            }


def test_recent_domain_losses_keep_each_domains_last_steps():
    recent = RecentDomainLosses(n_domains=3, steps=2)
    for losses, domains in [
        ([1.0, 2.0], [0, 0]),
        ([4.0], [1]),
        ([8.0, 16.0], [0, 1]),
        ([32.0], [0]),
    ]:
        recent.add(torch.tensor(losses), torch.tensor(domains))
    totals = recent.totals()
    # Domain 0 appeared in steps 1, 3, 4: the last two give (8 + 32, 2 blocks).
    assert totals.tolist() == [[40.0, 2.0], [20.0, 2.0], [0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_next_token_loss_equals_one_pass(dtype):
    torch.manual_seed(0)
    logits = torch.randn(5, 9, 40, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, 40, (5, 9))
    upstream = torch.randn(5, 8)
    whole = _chunk_losses(logits, ids)
    (grad_whole,) = torch.autograd.grad((whole * upstream).sum(), logits)
    for chunk in (1, 8 * 40, 2 * 8 * 40 + 1, 10**9):  # 1 block, 2 blocks, all
        losses = next_token_losses(logits, ids, chunk)
        assert losses.dtype == torch.float32 and losses.shape == (5, 8)
        (grad,) = torch.autograd.grad((losses * upstream).sum(), logits)
        assert torch.equal(losses, whole) and torch.equal(grad, grad_whole)
    with torch.no_grad():
        assert torch.equal(next_token_losses(logits, ids, 1), whole)


def test_fused_adamw_on_cuda_only_and_never_over_the_config():
    module = tiny_module()
    assert module._fused_option() == {}  # CPU: the default implementation, as before
    module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3)
    module._device = torch.device("cuda", 0)  # the option is decided from the device alone
    assert module._fused_option() == {"fused": True}
    module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3, fused=False)
    assert module._fused_option() == {}
    module.optimizer_factory = functools.partial(torch.optim.SGD, lr=1e-3)
    assert module._fused_option() == {"fused": True}  # SGD takes fused too


def test_compile_compiles_each_block_in_place_and_keeps_the_weights_names():
    plain, compiled = tiny_module(), tiny_module(compile=True)
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    blocks = compiled.model.transformer.h
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert all(block._compiled_call_impl is None for block in plain.model.transformer.h)


def test_dispatch_is_recorded_in_the_config_tree():
    cfg = compose_config(["experiment=debug"])
    with open_dict(cfg):
        assert cfg.model.moe.dispatch == "auto" and cfg.model.compile is False


# ---------------------------------------------------------------------- CUDA only

needs_fused_grouped_mm = pytest.mark.skipif(
    not (torch.cuda.is_available() and cutlass_grouped_mm()),
    reason="needs a CUDA device with the fused grouped GEMM (compute capability 9.x / 10.x)",
)


@pytest.mark.cuda
@needs_fused_grouped_mm
def test_grouped_training_steps_make_no_host_sync_on_cuda():
    """Forward, aux losses, per-domain sums, backward, clipping and fused AdamW of the grouped
    path in bf16, with CUDA's sync debug mode set to raise on any synchronisation."""
    module = tiny_module(
        block_size=64,
        vocab_size=512,
        n_positions=64,
        n_embd=64,
        n_head=4,
        moe={"layers": [1], "n_experts": 4, "dispatch": "grouped"},
    ).cuda()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, **module._fused_option())
    batch = {
        "input_ids": torch.randint(0, 512, (6, 64), device="cuda"),
        "domains": ["code", "math", "prose", "code", "math", "code"],
    }
    for _ in range(2):  # warm-up: allocator, lazy CUDA init, cuBLAS handles
        with torch.autocast("cuda", dtype=torch.bfloat16):
            module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = module.training_step(batch, 0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert {
        layer.last_dispatch for layer in module.model.modules() if hasattr(layer, "last_dispatch")
    } == {"grouped"}


class SyncGuard(L.Callback):
    """CUDA sync debug mode "error" from the start to the end of every training batch that
    is not a logging step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not pl_module._is_logging_step():
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")

    def on_exception(self, trainer, pl_module, exception) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@needs_fused_grouped_mm
def test_lightning_training_steps_of_the_grouped_path_make_no_host_sync_on_cuda(
    tiny_mirror, tiny_tokenizer_dir, tmp_path
):

    cfg = compose_config(
        tiny_overrides(
            tiny_mirror,
            tiny_tokenizer_dir,
            tmp_path,
            "trainer=gpu",
            "trainer.max_steps=8",
            "trainer.log_every_n_steps=4",
            "model.moe.dispatch=grouped",
            "model.n_embd=128",
            "callbacks.routing_analysis.every_n_steps=100",
            "trainer.enable_progress_bar=false",
        )
    )
    with open_dict(cfg):
        cfg.callbacks.sync_guard = {"_target_": f"{__name__}.SyncGuard"}
    out = train(cfg)
    assert out["global_step"] == 8 and out["moe_dispatch"] == "grouped"


def test_compiled_grouped_dispatch_outside_bf16_is_refused_in_one_line(tmp_path):
    cfg = compose_config(
        [
            "experiment=debug",
            "data/domains=sample",
            f"paths.run_dir={tmp_path}",
            "model.compile=true",
            "model.moe.dispatch=grouped",
        ]
    )
    with pytest.raises(UserError, match=r"model\.compile=true .*trainer\.precision=32-true"):
        train(cfg)
    assert not any(tmp_path.iterdir()) if tmp_path.exists() else True
    check_compile(True, "grouped", "bf16-mixed")
    check_compile(True, "auto", "32-true")
    check_compile(False, "grouped", "32-true")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_blocks_keep_the_fused_attention_kernel():
    """``model.compile=true`` compiles each block; attention must still run a fused SDPA
    kernel (flash / memory-efficient / cuDNN), which compiling the whole Hugging Face model
    can lose to the unfused math path."""
    module = tiny_module(
        block_size=256,
        vocab_size=512,
        n_positions=256,
        n_embd=256,
        n_head=4,
        moe={"layers": [1], "n_experts": 4},
        compile=True,
    ).cuda()
    ids = torch.randint(0, 512, (4, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        module(ids).float().sum().backward()  # compiles
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            module(ids).float().sum().backward()
        torch.cuda.synchronize()
    kernels = [event.key for event in profile.key_averages()]
    fused = [
        name for name in kernels if re.search(r"flash|fmha|sdpa|cudnn.*attn", name, re.IGNORECASE)
    ]
    assert fused, f"no fused attention kernel among {kernels[:40]}"
