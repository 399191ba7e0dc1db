"""The multi-domain data pipeline: sources -> tokenize -> pack -> dataset.

The original spec's names are importable from here.
"""

from moe_emergence.data.cli import main
from moe_emergence.data.dataset import PackedMixedDomainDataset, collate_packed
from moe_emergence.data.hub import HubUnavailableError
from moe_emergence.data.packing import pack_sequences
from moe_emergence.data.settings import DataSettings
from moe_emergence.data.sources import (
    DEFAULT_SOURCES,
    DOMAINS,
    Source,
    load_code_data,
    load_math_data,
    load_prose_data,
)
from moe_emergence.data.tokenize import TokenStream, encode_texts, load_tokenizer

__all__ = [
    "DEFAULT_SOURCES",
    "DOMAINS",
    "DataSettings",
    "HubUnavailableError",
    "MixedDomainDataModule",
    "PackedMixedDomainDataset",
    "Source",
    "TokenStream",
    "collate_packed",
    "encode_texts",
    "load_code_data",
    "load_math_data",
    "load_prose_data",
    "load_tokenizer",
    "main",
    "pack_sequences",
]


def __getattr__(name: str):
    # Lightning is imported only when the datamodule is asked for (the data CLI needs none).
    if name == "MixedDomainDataModule":
        from moe_emergence.data.datamodule import MixedDomainDataModule

        return MixedDomainDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
