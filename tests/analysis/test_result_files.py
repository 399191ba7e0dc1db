"""A run's analysis written and read back (``result.json.xz``): every value exact (NaN, float32
and int64 arrays, int keys, tuples, paths), other values refused when written."""

from __future__ import annotations

import lzma
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from moe_emergence.analysis.result_files import read_result, write_result
from moe_emergence.analysis.results import CheckpointResult, HeldOutLoss, KnockoutEffect, RunResult
from moe_emergence.errors import UserError


def _result(counts: np.ndarray) -> RunResult:
    checkpoint = CheckpointResult(
        step=400,
        counts={2: counts},
        losses={"code": HeldOutLoss(loss=0.1 + 0.2, tokens=12_345)},
        token_types={3: np.arange(6, dtype=np.int64).reshape(2, 3)},
    )
    knockout = KnockoutEffect(
        layer=2,
        removed="math",
        measured="math",
        preferred=1,
        control=3,
        preferred_share=np.float64(1 / 3),
        control_share=float("nan"),
        intact=math.pi,
        preferred_change=1e-300,
        control_change=-0.0,
        difference=np.float32(0.1).item(),
        preferred_interval=(0.25, float("inf")),
        control_interval=(-1.5, 2.5),
        difference_interval=(float("nan"), 0.0),
        tokens=7,
    )
    return RunResult(
        name="primary_a/0_condition=top1,seed=1",
        run_dir=Path("/tmp/somewhere/0"),
        group="condition=top1",
        seed=1,
        overrides=["condition=top1"],
        moe=True,
        domains=("code", "math", "prose"),
        layers=[2, 3],
        n_experts=4,
        probe="held_out",
        probe_blocks={"code": 3, "math": 3, "prose": 3},
        checkpoints=[CheckpointResult(step=0), checkpoint],
        dispatch="grouped",
        nmi_change_intervals={2: (0.01, 0.3)},
        initial_model="ab" * 32,
        null_permutations=999,
        knockout=[knockout],
    )


def _same(a, b) -> bool:
    """Equal, NaN equal to NaN, arrays by dtype, shape and bits."""
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float):  # bit for bit (-0.0 is not 0.0); NaN reads back as NaN
        both_nan = math.isnan(a) and type(b) is float and math.isnan(b)
        return both_nan or (type(b) is float and struct.pack("d", a) == struct.pack("d", b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(
            _same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__
        )
    return type(a) is type(b) and a == b


def test_a_result_reads_back_exactly(tmp_path):
    counts = np.array([[1, 0, 2, 3], [0, 5, 0, 1], [4, 4, 4, 4]], dtype=np.int64)
    result = _result(counts)
    write_result(result, tmp_path)
    back, code = read_result(tmp_path / "result.json.xz")
    expected = _result(counts)
    expected.knockout[0] = expected.knockout[0].__class__(
        **{**expected.knockout[0].__dict__, "preferred_share": 1 / 3}  # numpy scalars: floats
    )
    assert _same(expected, back)
    assert len(code) == 64
    floats = np.array([[0.1, np.nan], [np.float32(1e-8), -np.inf]], dtype=np.float32)
    write_result(_result(floats), tmp_path)
    assert _same(read_result(tmp_path / "result.json.xz")[0].final.counts[2], floats)


def test_values_without_an_exact_form_are_refused_and_bad_files_named(tmp_path):
    with pytest.raises(TypeError, match="dtype object"):
        write_result(_result(np.array([[1, None]], dtype=object)), tmp_path)
    (tmp_path / "result.json.xz").write_bytes(b"not xz")
    with pytest.raises(UserError, match="not a readable run result"):
        read_result(tmp_path / "result.json.xz")
    (tmp_path / "result.json.xz").write_bytes(lzma.compress(b'{"format": 1, "result": {"@": 3}}'))
    with pytest.raises(UserError, match="damaged run result"):
        read_result(tmp_path / "result.json.xz")
