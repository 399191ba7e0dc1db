"""The multi-domain data pipeline: sources -> tokenize -> pack -> dataset.

The original spec's names are importable from here. ``load_tokenizer`` is
:func:`moe_emergence.data.prepare.load_data_tokenizer`: any name ``data.tokenizer`` takes,
``sample_bpe`` included.
"""

from moe_emergence.data.dataset import PackedMixedDomainDataset, collate_packed
from moe_emergence.data.domains import (
    DomainSet,
    domain_set,
    load_code_data,
    load_math_data,
    load_prose_data,
)
from moe_emergence.data.packing import pack_sequences
from moe_emergence.data.prepare import load_data_tokenizer as load_tokenizer
from moe_emergence.data.settings import DataSettings, LoaderSettings
from moe_emergence.data.sources import Source
from moe_emergence.data.tokenize import TokenStream, encode_texts
from moe_emergence.hub import HubUnavailableError

__all__ = [
    "DataSettings",
    "DomainSet",
    "HubUnavailableError",
    "LoaderSettings",
    "MixedDomainDataModule",
    "PackedMixedDomainDataset",
    "Source",
    "TokenStream",
    "collate_packed",
    "domain_set",
    "encode_texts",
    "load_code_data",
    "load_math_data",
    "load_prose_data",
    "load_tokenizer",
    "pack_sequences",
]


def __getattr__(name: str):
    # Loaded on first use, not on `import moe_emergence.data`: the datamodule brings Lightning
    # (~4 s), which the data CLI does without; `main` is the
    # spec's name for the data CLI (`python -m moe_emergence.data`), which nothing here needs.
    if name == "MixedDomainDataModule":
        from moe_emergence.data.datamodule import MixedDomainDataModule

        return MixedDomainDataModule
    if name == "main":
        from moe_emergence.data.cli import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
