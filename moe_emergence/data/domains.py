"""Domain sets: which domains a run trains on, in order, and each domain's ordered sources.

A domain set is written once, as YAML under ``conf/data/domains/<name>.yaml`` (the Hydra group
``data/domains``)::

    domain_set:
      math:                                   # a domain: its sources, read in order
        - dataset: openai/gsm8k               # Hub id, or a folder; sample/... = offline corpus
          configs: [main]                     # read round-robin (default: [null])
          text: "Problem: {question}\\n\\nSolution: {answer}"   # str.format over the fields
          split: train                        # default train
          min_chars: null                     # keep min_chars < len(text) < max_example_chars
          revision: null                      # Hub revision (default: the newest)

The ``domain_set`` setting (``data.domain_set``) holds such a mapping (what Hydra composes), a
set's name (a file in ``conf/data/domains/``), a path to a YAML file, or null for the source's
default set (:func:`default_set`: ``conf/data/mixed.yaml`` picks it, written there once).
:func:`parse_domains` turns it into
``{domain: (Source, ...)}`` and raises ValueError naming the sub-key for a bad one (the settings
prefix the config key).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from moe_emergence.data.sources import Source
from moe_emergence.settings import config_dir

DOMAIN_SETS_DIR = Path("data") / "domains"  # under conf/: the Hydra group data/domains
SET_KEY = "domain_set"  # the key a set file sets: data.domain_set
DEFAULTS_FILE = Path("data") / "mixed.yaml"  # under conf/: its defaults list picks the default set
SAMPLE_SET = "sample"  # the offline corpus' set: the default of data.source=sample
SAMPLE_PREFIX = "sample/"  # datasets of the offline corpus (moe_emergence.data.sample)
DOMAIN_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # becomes metric keys and CSV columns
MAX_DOMAINS = 255  # domain ids are uint8 in the block order
MAX_DOMAIN_NAME = 200  # characters: names the cache files <name>.offsets.bin (255-byte names)
SOURCE_KEYS = tuple(f.name for f in dataclasses.fields(Source))
REQUIRED_KEYS = ("dataset", "text")

DomainSet = dict[str, tuple[Source, ...]]


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key written twice in one mapping (a duplicate domain)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ValueError(
                    f"'{key}' is written twice (line {key_node.start_mark.line + 1} of "
                    f"{key_node.start_mark.name}): write each domain, and each key, once"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def domain_set_path(name: str | os.PathLike) -> Path:
    """The YAML file of the set ``name``: a file in ``conf/data/domains/`` or a path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        return path
    return config_dir() / DOMAIN_SETS_DIR / f"{name}.yaml"


def available_sets() -> list[str]:
    """Names of the domain sets in ``conf/data/domains/``."""
    return sorted(p.stem for p in (config_dir() / DOMAIN_SETS_DIR).glob("*.yaml"))


def default_set(source: str = "hub") -> str:
    """The name of ``source``'s default domain set: the offline corpus' for ``sample``, else
    the ``domains`` choice in the defaults list of ``conf/data/mixed.yaml`` (what train.py
    composes; the one place the default set is written)."""
    if source == "sample":
        return SAMPLE_SET
    path = config_dir() / DEFAULTS_FILE
    defaults = _read_set_file(path.resolve(), path.stat().st_mtime_ns).get("defaults") or []
    for entry in defaults:
        if isinstance(entry, Mapping) and "domains" in entry:
            return str(entry["domains"])
    raise ValueError(f"'{path}' picks no domain set (a 'domains: <name>' in its defaults list)")


@functools.lru_cache(maxsize=32)
def _read_set_file(path: Path, mtime_ns: int) -> Any:
    del mtime_ns  # part of the cache key only: an edited file is read again
    with path.open(encoding="utf-8") as f:
        return yaml.load(f, Loader=_UniqueKeyLoader)


def read_domain_set(name: str | os.PathLike) -> Any:
    """The ``domain_set`` mapping of the set file ``name`` (unchecked: :func:`parse_domains`)."""
    path = domain_set_path(name)
    if not path.is_file():
        known = ", ".join(available_sets())
        raise ValueError(
            f"no domain set '{name}' ('{path}' is not a file): name one of {known}, or a "
            f"YAML file holding a '{SET_KEY}:' mapping"
        )
    try:
        content = _read_set_file(path.resolve(), path.stat().st_mtime_ns)
    except yaml.YAMLError as exc:
        raise ValueError(f"'{path}' is not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(content, Mapping) or SET_KEY not in content:
        raise ValueError(f"'{path}' holds no '{SET_KEY}:' mapping")
    return copy.deepcopy(content[SET_KEY])  # the caller's own: the parsed file is cached


def plain_containers(value: Any) -> Any:
    """A composed config's containers as plain dicts and lists (duck-typed: data imports no
    config machinery)."""
    if isinstance(value, Mapping):
        return {k: plain_containers(v) for k, v in value.items()}
    if isinstance(value, list | tuple) or type(value).__name__ == "ListConfig":
        return [plain_containers(v) for v in value]
    return value


def _template_fields(where: str, text: Any) -> list[str]:
    if not isinstance(text, str) or not text:
        raise ValueError(f"{where}.text must be a non-empty str.format template, got {text!r}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{where}.text {text!r} is not a valid template ({exc})") from None
    bad = [f for f in fields if not f.isidentifier()]
    if bad or not fields:
        raise ValueError(
            f"{where}.text {text!r} must name the example's fields as {{field}} "
            f"(got {bad or 'no field'}); write a literal brace as {{{{ or }}}}"
        )
    return fields


def _source(where: str, entry: Any) -> Source:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(SOURCE_KEYS)}")
    unknown = [k for k in entry if k not in SOURCE_KEYS]
    if unknown:
        raise ValueError(
            f"{where} has unknown key(s) {', '.join(map(str, unknown))}; a source's keys are "
            f"{', '.join(SOURCE_KEYS)}"
        )
    missing = [k for k in REQUIRED_KEYS if entry.get(k) is None]
    if missing:
        raise ValueError(f"{where} needs {' and '.join(missing)}")
    if not isinstance(entry["dataset"], str) or not entry["dataset"]:
        raise ValueError(f"{where}.dataset must be a Hub id or a folder, got {entry['dataset']!r}")
    _template_fields(where, entry["text"])
    configs = entry.get("configs", [None])
    configs = [None] if configs is None else configs
    if not isinstance(configs, list) or not configs:
        raise ValueError(f"{where}.configs must be a non-empty list (or null), got {configs!r}")
    if len(set(configs)) != len(configs) or not all(
        c is None or isinstance(c, str) for c in configs
    ):
        raise ValueError(f"{where}.configs must be distinct names (or null), got {configs}")
    min_chars = entry.get("min_chars")
    if min_chars is not None and (
        isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 0
    ):
        raise ValueError(f"{where}.min_chars must be an integer ≥ 0 or null, got {min_chars!r}")
    for key in ("split", "revision"):
        value = entry.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}.{key} must be a string, got {value!r}")
    return Source(
        dataset=entry["dataset"],
        text=entry["text"],
        configs=tuple(configs),
        split=entry.get("split") or "train",
        min_chars=min_chars,
        revision=entry.get("revision"),
    )


def set_file_settings(name: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """``(path, {key: value})``: the set file's keys other than ``domain_set`` (``source``,
    ``tokenizer``, ...: ``data.*`` values that Hydra's ``data/domains=<name>`` sets beside it);
    ``{}`` for a file that is not a readable set (:func:`read_domain_set` says why)."""
    path = domain_set_path(name)
    try:
        content = _read_set_file(path.resolve(), path.stat().st_mtime_ns)
    except (OSError, ValueError, yaml.YAMLError):
        return path, {}
    if not isinstance(content, Mapping):
        return path, {}
    return path, {str(k): copy.deepcopy(v) for k, v in content.items() if k != SET_KEY}


def parse_domains(spec: Any, source: str = "hub") -> DomainSet:
    """``{domain: (Source, ...)}`` in the set's order from the ``domain_set`` setting (see the
    module docstring). Raises ValueError naming the sub-key (``math[1].text``) for a bad set:
    fewer than two domains, a bad name, an empty domain, an unknown or missing source key, a
    template that names no field; and for a set that does not match ``source`` (``sample``
    reads the offline corpus' ``sample/...`` datasets only, ``hub`` none of them)."""
    if spec is None:
        spec = default_set(source)
    if isinstance(spec, str | os.PathLike):
        spec = read_domain_set(spec)
    spec = plain_containers(spec)
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"must map each domain to its list of sources (or name a domain set), got {spec!r}"
        )
    if not 2 <= len(spec) <= MAX_DOMAINS:
        raise ValueError(
            f"has {len(spec)} domain(s) ({', '.join(map(str, spec)) or 'none'}): a routing "
            f"study needs at least 2 (and at most {MAX_DOMAINS})"
        )
    found: DomainSet = {}
    for name, sources in spec.items():
        if not isinstance(name, str) or not DOMAIN_NAME.fullmatch(name):
            raise ValueError(
                f"domain name {name!r} must start with a letter and hold only letters, digits "
                f"and _ (it names metrics and table columns)"
            )
        if len(name) > MAX_DOMAIN_NAME:
            raise ValueError(
                f"domain name '{name[:20]}...' has {len(name)} characters: at most "
                f"{MAX_DOMAIN_NAME} (it names the token cache's files), so shorten it"
            )
        if not isinstance(sources, list) or not sources:
            raise ValueError(f"{name} has no sources: give it a list of at least one source")
        found[name] = tuple(_source(f"{name}[{i}]", entry) for i, entry in enumerate(sources))
    _check_source_kind(found, source)
    return found


def _check_source_kind(domains: DomainSet, source: str) -> None:
    for name, sources in domains.items():
        for i, s in enumerate(sources):
            offline = s.dataset.startswith(SAMPLE_PREFIX)
            if source == "sample" and not offline:
                raise ValueError(
                    f"{name}[{i}].dataset '{s.dataset}' is not part of the offline sample "
                    f"(source=sample reads {SAMPLE_PREFIX}... datasets only): pick the sample "
                    f"set (train.py: data/domains=sample; data CLI: --domain-set sample), or the "
                    f"Hub's datasets (data.source=hub; data CLI: --source hub)"
                )
            if source != "sample" and offline:
                raise ValueError(
                    f"{name}[{i}].dataset '{s.dataset}' is the offline sample's, which "
                    f"source={source} does not read: for the Hub's datasets pick a Hub set "
                    f"(train.py: data/domains=code_math_prose; data CLI: --domain-set "
                    f"code_math_prose); for the sample, the source sample (train.py: "
                    f"data/domains=sample; data CLI: --source sample)"
                )


def domain_set(name: str) -> DomainSet:
    """The checked set ``name`` of ``conf/data/domains/`` (its source told by its datasets)."""
    raw = read_domain_set(name)
    offline = all(
        str(e.get("dataset", "")).startswith(SAMPLE_PREFIX)
        for sources in (raw or {}).values()
        for e in (sources or [])
        if isinstance(e, Mapping)
    )
    return parse_domains(raw, "sample" if offline else "hub")


__all__ = [
    "SAMPLE_SET",
    "DomainSet",
    "available_sets",
    "default_set",
    "domain_set",
    "domain_set_path",
    "parse_domains",
    "read_domain_set",
]
