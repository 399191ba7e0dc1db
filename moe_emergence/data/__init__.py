"""The multi-domain data pipeline: sources -> tokenize -> pack -> dataset.

The original spec's names are importable from here. ``load_tokenizer`` is
:func:`moe_emergence.data.prepare.load_data_tokenizer`: any name ``data.tokenizer`` takes,
``sample_bpe`` included.
"""

from moe_emergence.lazy import lazy_exports

# name -> the module that defines it, imported on first use (moe_emergence.lazy)
_EXPORTS = {
    "DataSettings": "moe_emergence.data.settings",
    "DomainSet": "moe_emergence.data.domains",
    "HubUnavailableError": "moe_emergence.hub",
    "LoaderSettings": "moe_emergence.data.settings",
    "MixedDomainDataModule": "moe_emergence.data.datamodule",
    "PackedMixedDomainDataset": "moe_emergence.data.dataset",
    "Source": "moe_emergence.data.sources",
    "TokenStream": "moe_emergence.data.tokenize",
    "collate_packed": "moe_emergence.data.dataset",
    "domain_set": "moe_emergence.data.domains",
    "encode_texts": "moe_emergence.data.tokenize",
    "load_code_data": "moe_emergence.data.legacy",
    "load_math_data": "moe_emergence.data.legacy",
    "load_prose_data": "moe_emergence.data.legacy",
    "load_tokenizer": "moe_emergence.data.prepare:load_data_tokenizer",
    "main": "moe_emergence.data.cli",
    "pack_sequences": "moe_emergence.data.legacy",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
