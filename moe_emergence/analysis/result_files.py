"""One run's analysis as a file: ``runs/<run>/result.json.xz`` beside its tables, so that a
later ``analyze`` can summarise the run again without its checkpoints (sweeps of one study
trained in several sittings, whose checkpoints are gone: their analyses are passed as PATHs).

The file is the whole :class:`~moe_emergence.analysis.results.RunResult`, exact: JSON (floats
as Python writes them, which read back bit for bit; NaN as ``NaN``), every array with its dtype
and shape, compressed with xz. A summary of read-back results equals the summary of the
results themselves, byte for byte (tested). ``format`` changes when the record's fields do; a
file of another format is refused, naming the fix (analyse the runs from their checkpoints).
``analysis_code`` is a SHA-256 of the analysis package's sources at writing: ``analyze`` says
when a reused run was measured by other code.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from moe_emergence.analysis.results import CheckpointResult, HeldOutLoss, KnockoutEffect, RunResult
from moe_emergence.analysis.scores import LayerScores
from moe_emergence.analysis.specialisation import ExpertTokens, LayerSpecialisation
from moe_emergence.errors import UserError
from moe_emergence.files import write_atomic

RESULT_FILE = "result.json.xz"
FORMAT = 1
TYPE = "@"  # the key that names an encoded value's type
_RECORDS = {
    cls.__name__: cls
    for cls in (
        RunResult,
        CheckpointResult,
        HeldOutLoss,
        KnockoutEffect,
        LayerScores,
        LayerSpecialisation,
        ExpertTokens,
    )
}


@cache
def analysis_code() -> str:
    """SHA-256 of the analysis package's ``.py`` sources (sorted by name)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _encode(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if name not in _RECORDS:
            raise TypeError(f"{name} is not a record of a run's analysis")
        return {TYPE: name, **{f.name: _encode(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"an array of dtype {value.dtype} has no exact JSON form")
        data = value.ravel().tolist()
        return {TYPE: "ndarray", "dtype": value.dtype.str, "shape": list(value.shape), "data": data}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return {TYPE: "Path", "path": str(value)}
    if isinstance(value, tuple):
        return {TYPE: "tuple", "items": [_encode(v) for v in value]}
    if isinstance(value, dict):  # keys of any type (MoE layers are ints)
        return {TYPE: "dict", "items": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{type(value).__name__} has no JSON form here")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value[TYPE]
    if kind == "ndarray":
        return np.array(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    if kind == "Path":
        return Path(value["path"])
    if kind == "tuple":
        return tuple(_decode(v) for v in value["items"])
    if kind == "dict":
        return {_decode(k): _decode(v) for k, v in value["items"]}
    record = _RECORDS[kind]
    return record(**{f.name: _decode(value[f.name]) for f in fields(record)})


def write_result(result: RunResult, folder: Path) -> Path:
    """Write ``folder/result.json.xz`` whole; returns its path."""
    record = {"format": FORMAT, "analysis_code": analysis_code(), "result": _encode(result)}
    text = json.dumps(record, separators=(",", ":"))
    return write_atomic(folder / RESULT_FILE, lzma.compress(text.encode("utf-8"), preset=6))


def read_result(path: Path, option: str = "PATH") -> tuple[RunResult, str]:
    """The run's result and the ``analysis_code`` that measured it. One-line
    :class:`UserError` for a file that is not one, or of another format."""
    fix = "analyse the run again from its checkpoints"
    try:
        record = json.loads(lzma.decompress(path.read_bytes()))
    except (OSError, lzma.LZMAError, ValueError) as exc:
        raise UserError(f"{option}: {path} is not a readable run result ({exc}): {fix}.") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        found = record.get("format") if isinstance(record, dict) else None
        raise UserError(
            f"{option}: {path} is a run result of format {found}, this analyze reads format "
            f"{FORMAT}: {fix}."
        )
    try:
        result = _decode(record["result"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{option}: {path} holds a damaged run result ({exc!r}): {fix}.") from None
    if not isinstance(result, RunResult):
        raise UserError(f"{option}: {path} holds no run result: {fix}.")
    return result, str(record.get("analysis_code"))
