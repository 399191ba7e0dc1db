"""The packing spec written the straightforward way: the baseline for ``bench_prepare.py``.

Spec: tokenize each text, append EOS after every text, concatenate a domain's tokens, cut them
into fixed ``block_size`` blocks and drop the tail (no padding); the token count is taken
before chunking. This is how a first version would do it: one ``tokenizer.encode`` call per
text, Python lists of ints, one ``torch.LongTensor`` per block. It is NOT used by the package
(``moe_emergence.data`` encodes in batches into flat uint16 streams); it exists only so the
benchmark has something to measure the package against and to check its tokens with.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def reference_pack(
    texts: Iterable[str], tokenizer, block_size: int
) -> tuple[list[torch.Tensor], int, list[int]]:
    """Pack ``texts`` per the spec with a transformers (fast) tokenizer.

    Returns ``(blocks, total_tokens, all_ids)``: the full ``block_size`` blocks as int64
    tensors, the number of tokens (EOS included) before the tail is dropped, and the whole
    concatenated id list (for checking another implementation against this one).
    """
    eos = tokenizer.eos_token_id
    all_ids: list[int] = []
    for text in texts:
        # transformers' encode does not truncate GPT-2 (it turns the backend's truncation
        # off per call); verbose=False silences the "longer than max length" warning.
        all_ids.extend(tokenizer.encode(text, add_special_tokens=False, verbose=False))
        all_ids.append(eos)
    num_blocks = len(all_ids) // block_size
    blocks = [
        torch.tensor(all_ids[i * block_size : (i + 1) * block_size], dtype=torch.long)
        for i in range(num_blocks)
    ]
    return blocks, len(all_ids), all_ids
