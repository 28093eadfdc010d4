"""Offline English text for training and evaluating lenses, split by topic.

No download: the documents are the Python standard library's reference prose
(`pydoc_data.topics.topics`, 79 topics, ~465K characters: the language reference behind `help()`)
and the bundled prompt sets (data/domain_prompts.json: prose, code, numbers). Each document has
a name (`pydoc:<topic>`, `prompts:<domain>`); the held-out split is a fixed set of whole
documents, chosen by the sha256 of their names, so no training step sees a held-out topic.

    train, heldout = split_documents(lens_documents())
    chunks = token_chunks(model.require_tokenizer(), list(train.values()), seq_len=128)
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

HELDOUT_FRACTION = 0.2
SEPARATOR = "\n\n"


def lens_documents() -> dict[str, str]:
    """{name: text}: every pydoc topic (`pydoc:<topic>`), then each bundled prompt domain (`prompts:<domain>`)."""
    from pydoc_data.topics import topics

    docs = {f"pydoc:{name}": text.strip() for name, text in sorted(topics.items())}
    raw = json.loads(resources.files("interp.data").joinpath("domain_prompts.json").read_text())
    for domain, texts in raw.items():
        if not domain.startswith("_"):
            docs[f"prompts:{domain}"] = SEPARATOR.join(texts)
    return docs


def _rank(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split_documents(
    docs: dict[str, str], heldout_fraction: float = HELDOUT_FRACTION, seed: int = 0
) -> tuple[dict[str, str], dict[str, str]]:
    """(train, heldout) by whole document: the round(fraction * n) names first in sha256(seed:name) order are held out.

    Deterministic and independent of the documents' order; at least one document on each side.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split, got {len(docs)}")
    order = sorted(docs, key=lambda n: _rank(n, seed))
    n_held = min(len(docs) - 1, max(1, round(heldout_fraction * len(docs))))
    held = set(order[:n_held])
    return ({n: t for n, t in docs.items() if n not in held}, {n: t for n, t in docs.items() if n in held})


def token_chunks(tokenizer: Any, texts: Sequence[str], seq_len: int, max_chunks: Optional[int] = None) -> Tensor:
    """Long[Tensor, "chunk seq_len"]: the texts joined by blank lines, tokenized once (no special tokens),
    cut into consecutive non-overlapping windows; the remainder is dropped."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ids = tokenizer.encode(SEPARATOR.join(texts), add_special_tokens=False)
    n = len(ids) // seq_len
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def lens_splits(tokenizer: Any, seq_len: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train chunks, held-out chunks) of `lens_documents()`, split by topic with `split_documents`."""
    train, held = split_documents(lens_documents(), seed=seed)
    return token_chunks(tokenizer, list(train.values()), seq_len), token_chunks(tokenizer, list(held.values()), seq_len)
