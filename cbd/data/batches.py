"""Token data: corpora tokenised once into memory-mapped uint32 files, and batches drawn from them.

Every batch is a ``(B, T+1)`` LongTensor of contiguous windows: inputs ``x[:, :-1]``, targets
``x[:, 1:]``. Random training windows depend only on ``(seed, step)``, so a run resumes exactly.

>>> ids = token_file("austen", "smollm2", "train")            # doctest: +SKIP
>>> next(train_batches(ids, batch_size=4, seq_len=256, seed=0)).shape   # doctest: +SKIP
torch.Size([4, 257])
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cbd.core.catalog import list_corpora
from cbd.core.names import check_known
from cbd.core.paths import assets_dir
from cbd.data.archives import build_once
from cbd.data.corpora import corpus, corpus_dir
from cbd.data.teachers import sha256_file
from cbd.data.tokenizers import load_tokenizer, tokenizer_dir
from cbd.errors import AssetUnavailableError, ShapeError

SPLITS = ["heldout", "train"]


def encode_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """Token ids of ``docs`` concatenated, each document followed by the tokenizer's eos id."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise AssetUnavailableError(
            f"tokenizer {tokenizer.name_or_path!r} has no eos token to separate documents; "
            "add eos_token to its tokenizer_config.json"
        )
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return np.fromiter(itertools.chain.from_iterable(d + [eos] for d in ids), dtype=np.uint32)


def token_file(corpus_name: str, tokenizer_name: str | Path, split: str) -> np.ndarray:
    """Memory-mapped uint32 token ids of one split, built once under ``assets_dir()/tokens``.

    ``corpus_name``: a packaged corpus or a corpus spec of one's own (``files:...``, cbd.data.external);
    ``tokenizer_name``: a tokenizer by name, or a folder holding ``tokenizer.json`` (a source's own).
    The cache key includes a hash of ``tokenizer.json``, so a replaced tokenizer is re-tokenised.
    """
    if ":" not in corpus_name:
        check_known(corpus_name, list_corpora(), "corpus")
    check_known(split, SPLITS, "split")
    if isinstance(tokenizer_name, Path):
        tok_key = f"source-{sha256_file(tokenizer_name / 'tokenizer.json')[:12]}"
    else:
        tok_key = f"{tokenizer_name}-{sha256_file(tokenizer_dir(tokenizer_name) / 'tokenizer.json')[:12]}"
    key = corpus_dir(corpus_name).name if ":" in corpus_name else corpus_name  # an external corpus: by content
    path = assets_dir() / "tokens" / key / tok_key / f"{split}.u32"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        docs = getattr(corpus(corpus_name), split)
        tok = (AutoTokenizer.from_pretrained(tokenizer_name) if isinstance(tokenizer_name, Path)
               else load_tokenizer(tokenizer_name))
        encode_documents(tok, docs).tofile(tmp)

    return np.memmap(build_once(path, build), dtype=np.uint32, mode="r")


def _check(tokens: np.ndarray, *, batch_size: int, seq_len: int, num_batches: int = 1) -> None:
    if batch_size < 1 or seq_len < 1 or num_batches < 1:
        raise ShapeError(
            f"batch_size={batch_size}, seq_len={seq_len}, num_batches={num_batches}: all must be >= 1"
        )
    if len(tokens) < seq_len + 1:
        raise ShapeError(f"{len(tokens)} tokens cannot hold one window of seq_len + 1 = {seq_len + 1}")


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
    return torch.from_numpy(tokens[idx].astype(np.int64))


def train_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int, start_step: int = 0
) -> Iterator[torch.Tensor]:
    """Endless random windows; batch ``k`` depends only on ``(seed, k)``, so resuming is exact."""
    _check(tokens, batch_size=batch_size, seq_len=seq_len)
    for step in itertools.count(start_step):
        rng = np.random.default_rng([seed, step])
        yield _windows(tokens, rng.integers(0, len(tokens) - seq_len, size=batch_size), seq_len)


def eval_batches(
    tokens: np.ndarray, *, batch_size: int, seq_len: int, num_batches: int, seed: int = 0
) -> list[torch.Tensor]:
    """Fixed windows, one per equal stratum of the split (disjoint when they fit).

    Strata are dealt round-robin, so every batch spans the whole split.
    """
    _check(tokens, batch_size=batch_size, seq_len=seq_len, num_batches=num_batches)
    n = batch_size * num_batches
    width = len(tokens) / n
    slack = max(width - (seq_len + 1), 0.0)  # room to jitter a window inside its stratum
    jitter = np.random.default_rng([seed]).random(n) * slack
    starts = np.minimum(np.arange(n) * width + jitter, len(tokens) - seq_len - 1).astype(np.int64)
    return [_windows(tokens, row, seq_len) for row in starts.reshape(batch_size, num_batches).T]


def calibration_batch(
    tokens: np.ndarray, *, batch_size: int = 4, seq_len: int = 128, seed: int = 0
) -> torch.Tensor:
    """One small batch spread across ``tokens`` (pass the train split), for importance scores."""
    return eval_batches(tokens, batch_size=batch_size, seq_len=seq_len, num_batches=1, seed=seed)[0]
