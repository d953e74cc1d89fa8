"""A weighted mix of corpora: recipe validation, the weighting rule, mixed batches, ChainData.

Offline: ChainData runs on three made-up corpora (a private CBD_ASSETS, a word-level tokenizer
registered under CBD_TOKENIZERS), so each token tells its corpus and split.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from cbd.core import catalog
from cbd.core.recipe import DataRecipe, Recipe, list_recipes, load_recipe
from cbd.data import corpora
from cbd.data.mix import allot_rows, effective_shares, mixed_fixed_batch, mixed_train_batches, row_domains

ANCHORS = [{"name": "a1", "num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 1}]
MIX3 = [{"name": "austen", "weight": 1}, {"name": "shakespeare", "weight": 1}, {"name": "fortunes", "weight": 1}]
OLD_DATA_KEYS = ["corpus", "eval_batches", "eval_batch_size", "eval_seq_len", "calibration_batch_size",
                 "calibration_seq_len"]


def recipe(data: dict, **extra) -> Recipe:
    return Recipe.model_validate({"name": "mixtest", "anchors": ANCHORS, "data": data, **extra})


# --- recipe validation ------------------------------------------------------------------------


def test_a_mix_validates_and_round_trips():
    r = recipe({"corpora": MIX3, "max_epochs": 2})
    assert r.data.mixed and r.data.weights == {"austen": 1.0, "shakespeare": 1.0, "fortunes": 1.0}
    dump = r.model_dump(mode="json")["data"]
    assert "corpus" not in dump and dump["corpora"][1] == {"name": "shakespeare", "weight": 1.0}
    assert Recipe.model_validate(r.model_dump(mode="json")) == r


def test_one_corpus_dumps_as_before_mixes():
    r = recipe({"corpus": "shakespeare"})
    assert not r.data.mixed and r.data.weights == {"shakespeare": 1.0}
    assert list(r.model_dump(mode="json")["data"]) == OLD_DATA_KEYS
    for name in list_recipes():  # one-corpus recipes record exactly the old keys; mixes round-trip too
        shipped = load_recipe(name)
        keys = list(shipped.model_dump(mode="json")["data"])
        if not shipped.data.mixed:
            assert keys == OLD_DATA_KEYS
        else:
            assert "corpus" not in keys and "corpora" in keys
        assert Recipe.model_validate(json.loads(json.dumps(shipped.model_dump(mode="json")))) == shipped
    assert load_recipe("default").data.mixed and load_recipe("tiny").data.mixed  # the general mix


@pytest.mark.parametrize(("data", "message"), [
    ({"corpora": [{"name": "austen", "weight": 1}, {"name": "tolstoy", "weight": 1}]}, "tolstoy"),
    ({"corpora": [{"name": "austen", "weight": 1}, {"name": "fortunes", "weight": 0}]}, "greater than 0"),
    ({"corpora": [{"name": "austen", "weight": 1}, {"name": "fortunes", "weight": -2}]}, "greater than 0"),
    ({"corpora": [{"name": "austen", "weight": 1}, {"name": "fortunes", "weight": float("inf")}]}, "finite"),
    ({"corpora": [{"name": "austen", "weight": 1}, {"name": "austen", "weight": 2}]}, "distinct"),
    ({"corpora": [{"name": "austen", "weight": 1}]}, "at least 2"),
    ({"corpora": [{"name": "austen"}, {"name": "fortunes", "weight": 1}]}, "weight"),
    ({"corpora": MIX3, "corpus": "austen"}, "not both"),
    ({"corpus": "austen", "max_epochs": 2}, "mix only"),
    ({"corpora": MIX3, "max_epochs": 0}, "greater than 0"),
    ({"corpora": MIX3, "calibration_batch_size": 2}, "a row of each"),
    ({"corpus": "tolstoy"}, "not a known corpus"),
])
def test_bad_data_sections_are_refused_with_reasons(data, message):
    with pytest.raises(ValueError, match=message):
        recipe(data)


def test_anchor_zero_needs_one_corpus():
    z = {"foreign": "gemma3-270m", "num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 1}
    recipe({"corpus": "austen"}, anchor_zero=z)
    with pytest.raises(ValueError, match="anchor_zero"):
        recipe({"corpora": MIX3}, anchor_zero=z)


def test_data_recipe_is_torch_free_and_checks_the_catalog():
    assert set(catalog.CORPORA) >= {"austen", "shakespeare", "fortunes"}
    assert DataRecipe().corpus == "austen" and not DataRecipe().mixed


# --- the weighting rule -----------------------------------------------------------------------


def test_shares_are_the_weights_while_no_corpus_is_repeated_past_the_cap():
    sizes = {"a": 1000, "b": 1000, "c": 1000}
    assert effective_shares({"a": 1, "b": 2, "c": 1}, sizes, run_tokens=1000, max_epochs=4) == pytest.approx(
        {"a": 0.25, "b": 0.5, "c": 0.25})
    assert effective_shares({"a": 1, "b": 3}, {"a": 1, "b": 1}, run_tokens=0, max_epochs=1) == {"a": 0.25, "b": 0.75}


def test_a_small_corpus_is_capped_and_the_rest_goes_to_the_others_by_weight():
    # run 10k tokens, cap 2 epochs: "small" (1k tokens) may take at most 0.2 of the stream
    shares = effective_shares({"small": 2, "a": 1, "b": 1}, {"small": 1000, "a": 10**6, "b": 10**6},
                              run_tokens=10_000, max_epochs=2)
    assert shares == pytest.approx({"small": 0.2, "a": 0.4, "b": 0.4})
    everyone = effective_shares({"a": 1, "b": 1}, {"a": 100, "b": 300}, run_tokens=10**6, max_epochs=4)
    assert everyone == pytest.approx({"a": 0.25, "b": 0.75})  # all capped: shares by size


def test_allot_rows_gives_every_corpus_a_row_then_rows_by_share():
    assert allot_rows(8, [1, 1, 1]) == [3, 3, 2]
    assert allot_rows(8, [0.9, 0.05, 0.05]) == [6, 1, 1]
    assert allot_rows(4, [1, 2, 1]) == [1, 2, 1]
    assert sum(allot_rows(7, [0.3, 0.3, 0.4])) == 7
    with pytest.raises(ValueError, match="one row of each"):
        allot_rows(2, [1, 1, 1])


@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 2, 1], [0.7, 0.2, 0.1]])
def test_row_shares_track_the_weights(weights):
    shares = np.asarray(weights) / sum(weights)
    rows = np.concatenate([row_domains(shares, batch_size=4, seed=3, step=k) for k in range(2500)])
    got = np.bincount(rows, minlength=3) / len(rows)
    assert np.abs(got - shares).max() < 0.002  # 10k rows; random draws would be off by ~0.005
    short = np.concatenate([row_domains(shares, batch_size=4, seed=3, step=k) for k in range(40)])
    assert np.abs(np.bincount(short, minlength=3) / len(short) - shares).max() < 0.03  # a 40-step run too


def test_every_batch_mixes_domains():
    for k in range(200):
        assert len(set(row_domains([1, 1, 1], batch_size=4, seed=0, step=k).tolist())) >= 2


# --- mixed batches on synthetic ids -----------------------------------------------------------

DOMAINS = [np.arange(0, 5000, dtype=np.uint32), np.arange(10_000, 12_000, dtype=np.uint32),
           np.arange(20_000, 20_500, dtype=np.uint32)]  # an id tells its domain: id // 10_000


def test_mixed_train_batches_are_deterministic_and_resumable_by_seed():
    def take(seed, start=0, n=6):
        return list(itertools.islice(mixed_train_batches(DOMAINS, [1, 1, 1], batch_size=4, seq_len=16, seed=seed,
                                                         start_step=start), n))

    first, again, resumed, other = take(5), take(5), take(5, start=4, n=2), take(6, n=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert torch.equal(resumed[0], first[4]) and torch.equal(resumed[1], first[5])
    assert not torch.equal(first[0], other[0])
    for b in first:
        assert b.shape == (4, 17) and b.dtype == torch.long and bool((b.diff(dim=1) == 1).all())


def test_token_shares_of_many_batches_are_close_to_the_weights():
    weights = [3, 1, 1]
    batches = itertools.islice(mixed_train_batches(DOMAINS, weights, batch_size=4, seq_len=16, seed=0), 1500)
    tokens = torch.cat([b.flatten() for b in batches]).numpy() // 10_000
    got = np.bincount(tokens, minlength=3) / len(tokens)
    assert np.abs(got - np.asarray(weights) / 5).max() < 0.005


def test_mixed_fixed_batch_has_rows_of_every_domain_by_share():
    batch = mixed_fixed_batch(DOMAINS, [1, 1, 1], n_rows=8, seq_len=16, seed=0)
    dom = (batch[:, 0] // 10_000).tolist()
    assert batch.shape == (8, 17) and sorted(dom) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert all(len(set(dom[i : i + 4])) == 3 for i in (0, 4))  # each validation half holds every domain
    assert torch.equal(batch, mixed_fixed_batch(DOMAINS, [1, 1, 1], n_rows=8, seq_len=16, seed=0))


# --- ChainData on made-up corpora -------------------------------------------------------------

FAKE = {"alpha": "a", "beta": "b", "gamma": "g"}  # corpus -> its word prefix


def fake_docs(prefix: str) -> dict[str, list[str]]:
    rng = np.random.default_rng(len(prefix) + ord(prefix))
    train = {f"work{k}": [" ".join(f"{prefix}{w}" for w in rng.integers(0, 40, 60)) for _ in range(8)]
             for k in range(5)}
    return train | {"kept": [" ".join(f"h{prefix}{w}" for w in rng.integers(0, 40, 300))]}


@pytest.fixture
def fake_corpora(tmp_path, monkeypatch):
    vocab = {"<unk>": 0, "<eos>": 1}
    for p in [*FAKE.values(), *(f"h{p}" for p in FAKE.values())]:
        vocab |= {f"{p}{w}": len(vocab) + w for w in range(40)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tmp_path / "toks" / "words")
    monkeypatch.setenv("CBD_ASSETS", str(tmp_path / "assets"))
    monkeypatch.setenv("CBD_TOKENIZERS", str(tmp_path / "toks"))
    for name, prefix in FAKE.items():
        monkeypatch.setitem(catalog.CORPORA, name, catalog.CorpusInfo("kept", {"test": name}))
        monkeypatch.setitem(corpora.FETCH, name, lambda prefix=prefix: fake_docs(prefix))
    id_to = {i: w.lstrip("h")[0] + ("-heldout" if w.startswith("h") else "") for w, i in vocab.items() if i > 1}
    return id_to


def mixed_recipe(weights=(1, 2, 1)) -> Recipe:
    return Recipe.model_validate({
        "name": "mixtest", "tokenizer": "words", "anchors": ANCHORS,
        "train": {"batch_size": 4, "seq_len": 16, "steps": 40},
        "data": {"corpora": [{"name": n, "weight": w} for n, w in zip(FAKE, weights, strict=True)],
                 "eval_batches": 2, "eval_batch_size": 2, "eval_seq_len": 16, "calibration_seq_len": 16}})


def labels(batch: torch.Tensor, id_to: dict) -> list[set[str]]:
    return [{id_to[i] for i in row.tolist() if i in id_to} for row in batch]


def test_chain_data_of_a_mix(fake_corpora):
    from cbd.chain.build import ChainData

    id_to = fake_corpora
    data = ChainData(mixed_recipe())
    assert data.domains == list(FAKE) and data.shares == pytest.approx([0.25, 0.5, 0.25])
    assert data.mix["epochs"]["alpha"] < 4 and data.mix["run_tokens"] == 40 * 4 * 16

    # training: never a held-out token, every row one domain, token shares by weight
    fn = data.batch_fn(seed=11)
    seen = []
    for step in range(300):
        for row in labels(fn(step), id_to):
            assert len(row) == 1 and not any(x.endswith("-heldout") for x in row)
            seen.append(row.pop())
    counts = {p: seen.count(p) / len(seen) for p in FAKE.values()}
    assert counts == pytest.approx({"a": 0.25, "b": 0.5, "g": 0.25}, abs=0.01)
    assert torch.equal(fn(7), data.batch_fn(seed=11)(7)) and not torch.equal(fn(7), data.batch_fn(seed=12)(7))

    # held-out: per domain, only that domain's kept work
    assert list(data.heldout_by_domain) == list(FAKE) and len(data.heldout) == 3 * 2
    for name, batches in data.heldout_by_domain.items():
        assert {x for b in batches for row in labels(b, id_to) for x in row} == {f"{FAKE[name]}-heldout"}

    # calibration and validation: every domain, training text only
    for batch in (data.calibration, torch.cat(data.validation)):
        rows = [r.pop() for r in labels(batch, id_to)]
        assert set(rows) == set(FAKE.values())
    assert [b.shape for b in data.validation] == [(4, 17), (4, 17)]
    assert all(len({r.pop() for r in labels(b, id_to)}) == 3 for b in data.validation)


def test_chain_data_of_one_corpus_is_unchanged(fake_corpora):
    from cbd.chain.build import ChainData
    from cbd.data import batches

    r = Recipe.model_validate({"name": "one", "tokenizer": "words", "anchors": ANCHORS,
                               "train": {"batch_size": 4, "seq_len": 16},
                               "data": {"corpus": "beta", "eval_batches": 2, "eval_batch_size": 2,
                                        "eval_seq_len": 16, "calibration_seq_len": 16}})
    data = ChainData(r)
    train = batches.token_file("beta", "words", "train")
    assert data.mix is None and data.domains == ["beta"]
    assert torch.equal(data.batch_fn(3)(5), next(batches.train_batches(train, batch_size=4, seq_len=16, seed=3,
                                                                      start_step=5)))
    assert torch.equal(data.calibration, batches.calibration_batch(train, batch_size=8, seq_len=16, seed=0))
    held = batches.eval_batches(batches.token_file("beta", "words", "heldout"), batch_size=2, seq_len=16,
                                num_batches=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(data.heldout, held, strict=True))
