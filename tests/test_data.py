"""Token data: batches on synthetic ids offline; real token files under ``teacher``."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cbd.data.batches import calibration_batch, encode_documents, eval_batches, token_file, train_batches
from cbd.errors import AssetUnavailableError, ShapeError, UnknownNameError

IDS = np.arange(10_000, dtype=np.uint32)  # window contents reveal their start


def is_contiguous(batch: torch.Tensor) -> bool:
    return bool((batch.diff(dim=1) == 1).all())


def word_tokenizer(eos: str | None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a b c d"], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **({"eos_token": eos} if eos else {}))


# --- encoding ---------------------------------------------------------------------------------


def test_encode_documents_ends_each_document_with_eos():
    tok = word_tokenizer("<eos>")
    ids = encode_documents(tok, ["a b", "c", "d d d"])
    a, b, c, d, eos = tok.convert_tokens_to_ids(["a", "b", "c", "d", "<eos>"])
    assert ids.dtype == np.uint32 and eos == tok.eos_token_id
    assert ids.tolist() == [a, b, eos, c, eos, d, d, d, eos]


def test_encode_documents_needs_an_eos():
    with pytest.raises(AssetUnavailableError, match="eos"):
        encode_documents(word_tokenizer(None), ["a"])


# --- training batches -------------------------------------------------------------------------


def test_train_batches_shape_and_contiguity():
    batch = next(train_batches(IDS, batch_size=4, seq_len=16, seed=0))
    assert batch.shape == (4, 17) and batch.dtype == torch.long
    assert is_contiguous(batch)


def test_train_batches_are_deterministic_and_resumable():
    first = list(itertools.islice(train_batches(IDS, batch_size=3, seq_len=8, seed=7), 6))
    again = list(itertools.islice(train_batches(IDS, batch_size=3, seq_len=8, seed=7), 6))
    resumed = list(itertools.islice(train_batches(IDS, batch_size=3, seq_len=8, seed=7, start_step=4), 2))
    other = next(train_batches(IDS, batch_size=3, seq_len=8, seed=8))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert torch.equal(resumed[0], first[4]) and torch.equal(resumed[1], first[5])
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], other)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 300), seq_len=st.integers(1, 64), seed=st.integers(0, 2**32))
def test_train_windows_stay_inside_the_data(n, seq_len, seed):
    ids = np.arange(n, dtype=np.uint32)
    if n < seq_len + 1:
        with pytest.raises(ShapeError):
            next(train_batches(ids, batch_size=2, seq_len=seq_len, seed=seed))
        return
    batch = next(train_batches(ids, batch_size=8, seq_len=seq_len, seed=seed))
    assert is_contiguous(batch) and batch.min() >= 0 and batch.max() < n


def test_windows_reach_both_ends():
    batches = itertools.islice(train_batches(IDS[:20], batch_size=64, seq_len=9, seed=0), 4)
    starts = torch.cat([b[:, 0] for b in batches])
    assert starts.min() == 0 and starts.max() == 20 - 10


# --- evaluation and calibration batches -------------------------------------------------------


def test_eval_batches_are_fixed_spread_and_disjoint():
    batches = eval_batches(IDS, batch_size=4, seq_len=31, num_batches=5)
    assert [b.shape for b in batches] == [(4, 32)] * 5
    again = eval_batches(IDS, batch_size=4, seq_len=31, num_batches=5)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    starts = np.sort(torch.cat(batches)[:, 0].numpy())
    assert all(is_contiguous(b) for b in batches)
    assert (np.diff(starts) >= 32).all()  # no token scored twice
    assert starts[0] < 10_000 / 20 and starts[-1] >= 10_000 * 19 / 20 - 32  # spread over the split
    first_batch = batches[0][:, 0]
    assert first_batch.max() - first_batch.min() > 5_000  # each batch spans the split


def test_eval_batches_seed_moves_windows_within_strata():
    a = eval_batches(IDS, batch_size=2, seq_len=15, num_batches=2, seed=0)
    b = eval_batches(IDS, batch_size=2, seq_len=15, num_batches=2, seed=1)
    assert not torch.equal(a[0], b[0])
    assert ((a[0][:, 0] // 2500) == (b[0][:, 0] // 2500)).all()


def test_eval_batches_overlap_when_data_is_short():
    batches = eval_batches(IDS[:40], batch_size=4, seq_len=31, num_batches=2)
    assert all(is_contiguous(b) and b.max() < 40 for b in batches)


def test_calibration_batch_default_shape():
    batch = calibration_batch(IDS)
    assert batch.shape == (4, 129) and is_contiguous(batch)


@pytest.mark.parametrize(
    ("kwargs", "numbers"),
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"seq_len": 0}, "seq_len=0"),
        ({"num_batches": 0}, "num_batches=0"),
        ({"seq_len": 10_000}, "10000 tokens"),
    ],
)
def test_bad_batch_sizes_raise_with_numbers(kwargs, numbers):
    with pytest.raises(ShapeError, match=numbers):
        eval_batches(IDS, **{"batch_size": 2, "seq_len": 8, "num_batches": 1, **kwargs})


# --- real token files -------------------------------------------------------------------------


def test_token_file_refuses_bad_names():
    with pytest.raises(UnknownNameError):
        token_file("../austen", "gpt2", "train")
    with pytest.raises(UnknownNameError):
        token_file("austen", "gpt2", "test")


@pytest.mark.teacher
def test_token_file_is_cached_memmap_with_one_eos_per_document():
    from cbd.data.corpora import corpus
    from cbd.data.tokenizers import load_tokenizer

    ids = token_file("austen", "gpt2", "heldout")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint32
    assert 100_000 < len(ids) < 130_000  # Persuasion, ~115k tokens
    eos = load_tokenizer("gpt2").eos_token_id
    assert ids[-1] == eos and int((ids == eos).sum()) == len(corpus("austen").heldout)
    assert token_file("austen", "gpt2", "heldout").filename == ids.filename


@pytest.mark.teacher
def test_train_and_heldout_token_files_differ():
    train, heldout = token_file("austen", "smollm2", "train"), token_file("austen", "smollm2", "heldout")
    assert len(train) > 5 * len(heldout)
    window = np.asarray(heldout[1000:1064])
    hits = np.flatnonzero(train == window[0])
    assert not any(np.array_equal(train[i : i + 64], window) for i in hits)
