"""Chains from one's own model and text: `path:` and `hf:` sources, file/JSONL corpora, fraction ladders, licences.

Small real chains (two anchors, two distillation steps, tiny shapes) from a tiny random Qwen3 and a
tiny random GPT-2 saved with ``save_pretrained`` in shards, and from the Qwen3 pushed to the
Hub-compatible test server and fetched by ``hf:alice/...@<commit>`` (or ``@main``, recorded as the commit
it resolved to), on a corpus of local text files plus a JSONL file. Each chain is served as deployed: an API
process and an RQ worker process (tests/conftest_service.py) with ``CBD_CHAINS`` at the chains the tests
built answer ``POST /initialize`` (202, then ``GET /jobs/{id}``); the files downloaded from the answer's URLs
load in stock transformers with the source's model type.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import httpx
import pytest
import torch
from conftest_service import children, redis_db, redis_server, wait_job
from hubserver import HubServer
from huggingface_hub import constants
from random_chain import WORDS, tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM
from typer.testing import CliRunner

from cbd.chain.build import build_chain
from cbd.cli.main import app as cli
from cbd.core.ladder import resolve_anchors, shape_for
from cbd.core.manifest import chain_dir, load_manifest
from cbd.core.paths import assets_dir
from cbd.core.plan import make_plan, target_spec
from cbd.core.recipe import Recipe, load_recipe
from cbd.core.request import InitRequest
from cbd.core.spec import ModelSpec
from cbd.data.external import HELDOUT_FRACTION, split_documents
from cbd.errors import RecipeError
from cbd.tensors.sharded import CheckpointReader

ALICE = "hf_alice_token_0123456789"
CARD = "---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# tiny\n"


def _sentences(rng: random.Random, n: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + " ." for _ in range(n))


SHARED_ASSETS = assets_dir()  # resolved before ``own`` points CBD_ASSETS at a private folder


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """Private assets (token and corpus caches, Hub snapshots) and chains; sources and corpora on disk."""
    root = tmp_path_factory.mktemp("own")
    mp = pytest.MonkeyPatch()
    mp.setenv("CBD_ASSETS", str(root / "assets"))
    mp.setenv("CBD_CHAINS", str(root / "chains"))
    rng = random.Random(0)
    text = root / "text"
    text.mkdir()
    for i in range(8):
        (text / f"doc{i}.txt").write_text(_sentences(rng, 40))
    with (root / "notes.jsonl").open("w") as f:
        for _ in range(30):
            f.write(json.dumps({"id": rng.random(), "body": _sentences(rng, 8)}) + "\n")
    torch.manual_seed(0)
    qwen = root / "qwen3"
    qwen.mkdir()
    vocab = tiny_tokenizer(qwen)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, intermediate_size=96,
                                 max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
                                 eos_token_id=2)).save_pretrained(qwen, max_shard_size="40KB")
    (qwen / "README.md").write_text(CARD)
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    tiny_tokenizer(gpt2)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=48, n_layer=3, n_head=6, n_positions=64, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(gpt2, max_shard_size="30KB")
    yield root
    mp.undo()


def recipe_text(name: str, source: str, *, extra: str = "", anchors: str = "ladder = [0.5, 0.2]") -> str:
    return f'''name = "{name}"
source = "{source}"
{extra}
{anchors}

[train]
batch_size = 2
seq_len = 32
steps = 2
warmup_steps = 1
ckpt_every = 0

[data]
corpora = [{{name = "files:text/*.txt", weight = 1}}, {{name = "jsonl:notes.jsonl:body", weight = 1}}]
eval_batches = 1
eval_batch_size = 2
eval_seq_len = 32
calibration_batch_size = 4
calibration_seq_len = 32
'''


DB = 10


@pytest.fixture(scope="module")
def service(own, redis_server, children, tmp_path_factory):
    """The API and one RQ worker as separate processes, serving the chains under ``own``'s ``CBD_CHAINS``
    (read per request: chains built after the start are served). ``CBD_SYNC_WAIT_S=0``: every new init is
    a 202 and a job to follow."""
    url = redis_db(redis_server, DB)
    env = {"CBD_ARTIFACTS": str(tmp_path_factory.mktemp("own-artifacts")), "CBD_SYNC_WAIT_S": "0",
           "CBD_ACCESS_LOG": "off"}
    worker = children.worker(url, **env)
    base, api = children.api(url, **env)
    with httpx.Client(base_url=base, timeout=60) as client:
        yield client
    if worker.poll() is not None or api.poll() is not None:
        print(children.log())


def serve_and_load(client: httpx.Client, name: str, model_type: str, tmp_path: Path, **arch) -> Path:
    """One LInit of the built chain from the service (POST /initialize, 202, GET /jobs/{id}), downloaded
    from the answer's URLs (size and sha256 checked); stock transformers loads it as ``model_type``."""
    r = client.post("/initialize", json={"chain": name, "architecture": arch})
    assert r.status_code == 202, r.text
    body = wait_job(client, r.headers["location"])
    assert body["status"] == "finished", body
    assert body["chain"] == name, body
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for fname, f in body["files"].items():
        data = client.get(f["url"]).content
        assert len(data) == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"], fname
        (folder / fname).write_bytes(data)
    plan = make_plan(InitRequest(chain=name, architecture=arch), load_manifest(name))  # what was asked for
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == model_type
    assert {k: getattr(model.config, k) for k in arch} == arch
    assert sum(p.numel() for p in model.parameters()) == plan.target.num_params()
    assert torch.isfinite(model(torch.tensor([[3, 4, 5, 6]])).logits).all()
    return folder


def test_sharded_reader_opens_one_shard_per_tensor_read(own):
    reader = CheckpointReader(own / "qwen3")
    assert len(reader.shards()) > 2  # save_pretrained split it
    reader("model.norm.weight")
    assert len(reader._open) == 1  # only the shard holding that tensor was opened


def test_qwen3_folder_chain_from_a_recipe_file_anywhere(own, service, tmp_path):
    path = own / "qwen.toml"  # not in anchors/: `cbd chain build PATH.toml`, relative paths from its folder
    # eval_every: each anchor's learning curve lands in its metrics
    path.write_text(recipe_text("own-qwen3", "path:qwen3").replace("ckpt_every = 0", "ckpt_every = 0\neval_every = 1"))
    r = CliRunner().invoke(cli, ["chain", "build", str(path)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    m = load_manifest("own-qwen3")
    src = ModelSpec.from_hf_config(json.loads((own / "qwen3/config.json").read_text()))
    assert m.anchors[0].spec == src and m.tokenizer == "source"
    assert [a.name for a in m.anchors] == ["a0", "a1", "a2"]
    fracs = [a.non_embedding_params / src.non_embedding_params() for a in m.anchors[1:]]
    assert fracs[0] > fracs[1] and 0.25 < fracs[0] < 0.75 and 0.08 < fracs[1] < 0.4  # the ladder, resolved
    assert all(a.spec.head_dim == 16 for a in m.anchors)
    assert m.anchors[0].metrics["source"] == {"source": f"path:{own / 'qwen3'}", "kind": "path",
                                              "license": "apache-2.0", "license_from": "model card"}
    assert all(a.metrics["license"] == "apache-2.0" for a in m.anchors)
    for a in m.anchors[1:]:  # a held-out reading at the start and after each step, the last the anchor's
        curve = a.metrics["heldout_curve"]
        assert [t for t, _ in curve] == [0, 64, 128], curve  # the start, then 2 steps of 2 x 32 tokens
        assert curve[-1][1] == a.metrics["heldout_loss"]
    assert set(m.anchors[1].metrics["heldout_loss_by_domain"]) == {"files:" + str(own / "text/*.txt"),
                                                                   "jsonl:" + str(own / "notes.jsonl") + ":body"}
    a2 = m.anchors[2].spec
    folder = serve_and_load(service, "own-qwen3", "qwen3", tmp_path, num_hidden_layers=a2.num_hidden_layers + 1,
                            hidden_size=a2.hidden_size, num_attention_heads=a2.num_attention_heads,
                            head_dim=16)
    assert "license: apache-2.0" in (folder / "README.md").read_text()
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}


def test_gpt2_folder_chain_needs_a_stated_licence(own, service, tmp_path):
    unlicensed = Recipe.model_validate(tomlish(recipe_text("own-gpt2", f"path:{own / 'gpt2'}"), own))
    with pytest.raises(RecipeError, match="states no licence"):
        build_chain(unlicensed)
    assert not chain_dir("own-gpt2").exists()  # refused before any work
    recipe = unlicensed.model_copy(update={"license": "mit"})
    m = build_chain(recipe)
    assert m.anchors[0].spec.model_type == "gpt2" and m.anchors[0].metrics["source"]["license_from"] == "recipe"
    a1 = m.anchors[1].spec
    folder = serve_and_load(service, "own-gpt2", "gpt2", tmp_path, num_hidden_layers=a1.num_hidden_layers,
                            hidden_size=a1.hidden_size - a1.head_dim, num_attention_heads=a1.num_attention_heads - 1)
    assert "license: mit" in (folder / "README.md").read_text()


def tomlish(text: str, base: Path) -> dict:
    import tomllib

    from cbd.core.recipe import _absolute_paths

    return _absolute_paths(tomllib.loads(text), base)


@pytest.fixture(scope="module")
def hub(own):
    with pytest.MonkeyPatch.context() as mp, HubServer(own / "hub", tokens={ALICE: "alice"}) as server:
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setenv("HF_ENDPOINT", server.url)
        mp.setenv("HF_TOKEN", ALICE)
        server.lfs_threshold = 4096
        from cbd.store.hub import push_folder

        pushed = push_folder(own / "qwen3", "alice/tiny-qwen3", token=ALICE, endpoint=server.url)
        yield server, pushed.commit_sha


def test_hub_source_at_a_pinned_commit(own, hub, service, tmp_path):
    server, commit = hub
    recipe = Recipe.model_validate(tomlish(recipe_text("own-hub", f"hf:alice/tiny-qwen3@{commit}"), own))
    assert recipe.source_repo == "alice/tiny-qwen3" and recipe.tokenizer == "source"
    m = build_chain(recipe)
    assert m.anchors[0].metrics["source"]["commit"] == commit
    assert m.source == "alice/tiny-qwen3"
    assert any(p.endswith(".safetensors") for _, p in server.requests)  # real bytes came from the server
    from cbd.tensors.reader import LazyReader  # the same weights as the path: source, tensor for tensor

    hub_a0 = LazyReader(chain_dir("own-hub") / "a0/model.safetensors").load_all()
    path_a0 = LazyReader(chain_dir("own-qwen3") / "a0/model.safetensors").load_all()
    assert hub_a0.keys() == path_a0.keys() and all(torch.equal(hub_a0[k], path_a0[k]) for k in hub_a0)
    a1 = m.anchors[1].spec
    serve_and_load(service, "own-hub", "qwen3", tmp_path, num_hidden_layers=a1.num_hidden_layers,
                   hidden_size=a1.hidden_size, num_attention_heads=a1.num_attention_heads, head_dim=16)


def test_hub_source_at_a_branch_records_the_commit_it_resolved_to(own, hub, tmp_path):
    """``hf:...@main`` is a moving pin: the manifest records the commit main pointed at when the chain was built
    (main is moved past the fixture's commit first, so the pinned sha of the test above would not do)."""
    server, pinned = hub
    from cbd.store.hub import push_folder

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "NOTES.md").write_text("a later commit on main\n")
    moved = push_folder(notes, "alice/tiny-qwen3", token=ALICE, endpoint=server.url).commit_sha
    head = server.history("alice/tiny-qwen3")[-1].oid  # what the server has for main
    assert head == moved != pinned and len(head) == 40
    recipe = Recipe.model_validate(tomlish(recipe_text("own-hub-main", "hf:alice/tiny-qwen3@main"), own))
    m = build_chain(recipe)
    assert m.anchors[0].metrics["source"]["commit"] == head
    assert m.anchors[0].metrics["source"]["source"] == "hf:alice/tiny-qwen3@main"


def test_hub_wrong_revision_refused_before_any_work(own, hub):
    recipe = Recipe.model_validate(tomlish(recipe_text("own-badrev", "hf:alice/tiny-qwen3@no-such-rev"), own))
    with pytest.raises(RecipeError, match="no revision 'no-such-rev'"):
        build_chain(recipe)
    assert not chain_dir("own-badrev").exists()


@pytest.mark.parametrize(("cfg", "why"), [
    ({"model_type": "qwen3_moe", "num_experts": 8}, "model_type 'qwen3_moe' is not supported"),
    ({"model_type": "qwen2", "num_experts": 4}, "mixture of experts"),
    ({"model_type": "llama", "num_key_value_heads": [2, 4]}, "layers are not all alike"),
    ({"model_type": "qwen2", "use_sliding_window": True, "layer_types": ["full_attention", "sliding_attention"]},
     "layers are not all alike"),
    ({"model_type": "llama", "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling"),
    ({"model_type": "mamba"}, "model_type 'mamba'"),
])
def test_unsupported_sources_refused_naming_what_is(own, tmp_path, cfg, why):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    recipe = Recipe.model_validate(tomlish(recipe_text("own-bad", f"path:{tmp_path}", extra='license = "mit"'), own))
    with pytest.raises(RecipeError, match=why) as exc:
        build_chain(recipe)
    assert "supported: Llama" in str(exc.value) and "Qwen3" in str(exc.value)
    assert not chain_dir("own-bad").exists()


def test_pickle_only_source_refused(own, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((own / "qwen3/config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    from cbd.data.sources import source_folder

    with pytest.raises(RecipeError, match="never a pickle"):
        source_folder(f"path:{folder}")


def test_source_and_corpus_forms_checked_in_the_recipe():
    base = {"name": "x", "anchors": [{"name": "a1", "fraction": 0.3}]}
    for bad, why in (("hf:Org/Name", "must pin a revision"), ("gguf:/m", "not a known source"),
                     ("path:", "names no folder")):
        with pytest.raises(ValueError, match=why):
            Recipe.model_validate(base | {"source": bad})
    for bad, why in (("jsonl:/x/*.jsonl", "jsonl:GLOB:FIELD"), ("csv:/x", "not a known corpus"),
                     ("hf-dataset:org/d:train", "hf-dataset:NAME:SPLIT:FIELD")):
        with pytest.raises(ValueError, match=why):
            Recipe.model_validate(base | {"data": {"corpus": bad}})
    with pytest.raises(ValueError, match="shape .* or a fraction"):
        Recipe.model_validate({"name": "x", "anchors": [{"name": "a1"}]})


def test_recipe_folders_found_by_name(own, monkeypatch, tmp_path):
    from app.core.config import Settings

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "mine.toml").write_text(recipe_text("mine", "path:../../qwen3"))
    (folder / "misnamed.toml").write_text(recipe_text("other", "path:/x"))
    monkeypatch.setenv("CBD_RECIPES", str(folder))
    assert load_recipe("mine").name == "mine" and load_recipe("tiny").source == "smollm2-135m"
    with pytest.raises(RecipeError, match="must be called what its file is"):
        load_recipe("misnamed")
    s = Settings()
    assert s.recipe_exists("mine") and "mine" in s.recipes() and "tiny" in s.recipes()
    monkeypatch.delenv("CBD_RECIPES")
    assert not Settings().recipe_exists("mine")


def test_heldout_is_whole_documents_by_the_stated_rule():
    docs = [(f"d{i}", f"document {i} " * (10 + i)) for i in range(40)]
    train, held = split_documents(docs, "files:x")
    assert held and set(held) | set(train) == set(docs) and not set(held) & set(train)
    total = sum(len(d) for _, d in docs)
    assert sum(len(d) for _, d in held) - max(len(d) for _, d in held) < HELDOUT_FRACTION * total
    assert split_documents(list(reversed(docs)), "files:x")[1] == list(reversed(held))  # order-free choice
    with pytest.raises(RecipeError, match="at least 2"):
        split_documents(docs[:1], "files:x")


def test_fraction_ladder_is_valid_and_nested_for_every_family():
    smol = ModelSpec(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152)
    qwen3 = ModelSpec(model_type="qwen3", num_hidden_layers=28, hidden_size=1024, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936)
    gpt2 = ModelSpec(model_type="gpt2", num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                     intermediate_size=3072, vocab_size=50257, max_position_embeddings=1024)
    recipe = Recipe.model_validate({"name": "x", "ladder": [0.33, 0.11, 0.04]})
    for src in (smol, qwen3, gpt2):
        resolved = resolve_anchors(recipe, src)
        parent = src
        for a, want in zip(resolved.anchors, (0.33, 0.11, 0.04), strict=True):
            spec = target_spec(a, src)  # valid for the source (head dim, GQA, family)
            assert spec.head_dim == src.head_dim and spec.model_type == src.model_type
            assert all(x <= y for x, y in zip(spec.shape, parent.shape, strict=True))  # a subset of the one before
            assert abs(spec.non_embedding_params() / src.non_embedding_params() / want - 1) < 0.25
            parent = spec
    with pytest.raises(RecipeError, match="no smaller than the anchor before"):
        resolve_anchors(Recipe.model_validate({"name": "x", "ladder": [0.2, 0.19999]}), gpt2)
    assert shape_for(0.5, smol, smol).num_attention_heads % shape_for(0.5, smol, smol).kv_heads == 0


def test_chain_plan_prints_the_resolved_ladder(own):
    path = own / "qwen.toml"
    if not path.exists():
        path.write_text(recipe_text("own-qwen3", "path:qwen3"))
    r = CliRunner().invoke(cli, ["chain", "plan", str(path)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    out = r.output
    assert "licence apache-2.0 (from the model card)" in out and "estimated build:" in out
    resolved = resolve_anchors(load_recipe(path), ModelSpec.from_hf_config(
        json.loads((own / "qwen3/config.json").read_text())))
    for a in resolved.anchors:
        assert f"{a.num_hidden_layers} x {a.hidden_size}" in out


def test_parquet_column_and_jsonl_field_read_as_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cbd.core.sources import parse_corpus
    from cbd.data.external import _documents

    pq.write_table(pa.table({"text": ["one doc", "", "two doc"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    spec = f"parquet:{tmp_path}/*.parquet:text"
    assert [d for _, d in _documents(parse_corpus(spec), spec)] == ["one doc", "two doc"]  # empty ones dropped
    bad = f"parquet:{tmp_path}/*.parquet:body"
    with pytest.raises(RecipeError, match="no column 'body'"):
        _documents(parse_corpus(bad), bad)
    (tmp_path / "x.jsonl").write_text('{"t": "a"}\n{"u": "b"}\n')
    bad = f"jsonl:{tmp_path}/x.jsonl:t"
    with pytest.raises(RecipeError, match=r"x.jsonl:2 has no text field 't'"):
        _documents(parse_corpus(bad), bad)


@pytest.mark.slow
@pytest.mark.teacher
def test_real_teacher_as_a_path_builds_the_packaged_tiny_chain_bit_for_bit(tmp_path, monkeypatch):
    """SmolLM2-135M given as ``path:`` (its converted folder) builds the same `tiny` anchors, tensor for
    tensor, as the packaged name (anchor files differ only in their metadata: the chain's name).

    a0 (the source as read) and a1 (the one step that runs the source: importance, prune, and
    distillation steps against it as the teacher) are built both ways and compared, with the
    recipe's steps cut to 3 (what differs between the two is how the teacher is read, which every
    step uses alike; the packaged 40 would cost the suite minutes per build). a2 and a3 are made
    from a1 by the same code whatever the source was, so they follow."""
    from cbd.chain.build import ChainData, build_anchor
    from cbd.data.teachers import teacher_dir
    from cbd.tensors.reader import LazyReader
    from cbd.train.loop import _Run

    # the shared asset cache (the converted teacher, the tokenized corpora), not ``own``'s private one,
    # which this module's earlier tests leave set: there both builds converted and tokenized it all again
    monkeypatch.setenv("CBD_ASSETS", str(SHARED_ASSETS))
    # the held-out readings (the source's, and a1's before and after its steps: half of each build)
    # read the weights and change none of them; they are not what this test compares
    monkeypatch.setattr(ChainData, "evaluate_heldout", lambda self, model: (float("nan"), {}))
    monkeypatch.setattr(_Run, "evaluate", lambda self, batches: float("nan"))
    packaged = load_recipe("tiny")
    short = packaged.model_copy(update={"train": packaged.train.model_copy(update={"steps": 3})})
    path = short.model_copy(update={"name": "tiny-path", "source": f"path:{teacher_dir()}", "license": "apache-2.0"})
    roots = {"named": tmp_path / "named", "path": tmp_path / "path"}
    built = {}
    for (kind, root), recipe in zip(roots.items(), (short, path), strict=True):
        data: list = []
        built[kind] = [build_anchor(recipe, name, root=root, data=data) for name in ("a0", "a1")]
    assert [a.spec for a in built["path"]] == [a.spec for a in built["named"]]
    steps = short.train.batch_size * short.train.seq_len * 3  # 3 steps' tokens: the cut recipe ran
    assert built["named"][1].metrics["tokens"] == built["path"][1].metrics["tokens"] == steps
    for a in built["path"]:
        mine = LazyReader(chain_dir("tiny-path", roots["path"]) / a.name / "model.safetensors").load_all()
        theirs = LazyReader(chain_dir("tiny", roots["named"]) / a.name / "model.safetensors").load_all()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), a.name


def test_the_readme_recipe_is_a_valid_recipe():
    import tomllib

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("## Your own model and data", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    r = Recipe.model_validate(tomllib.loads(block))
    assert r.source.startswith("hf:") and r.tokenizer == "source" and len(r.anchors) == 3 and r.data.mixed
