"""Bridges: FVT vocabulary transfer, the aligned bridge run, published checkpoints; Gemma anchor zero."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from conftest_service import children, redis_db, redis_server  # noqa: F401 (fixtures, requested by name)
from safetensors import safe_open
from stock_loss import folder_nll, nll, random_init_nll
from transformers import AutoModelForCausalLM, AutoTokenizer

from cbd.bridge.aligned import BridgeData, heldout_batches
from cbd.bridge.train import bridge_loss, matched_kl, uld_loss
from cbd.bridge.vocab import bridge_spec, fvt, token_bytes, vocab_map
from cbd.chain.anchor_zero import SeqKDOptions, corpus_prompts, foreign_anchor_zero
from cbd.core.artifacts import artifact_dir
from cbd.core.plan import BridgeOptions, make_plan
from cbd.core.request import InitRequest
from cbd.core.threads import usable_cpus
from cbd.data.corpora import corpus_text
from cbd.data.tokenizers import load_tokenizer
from cbd.inits.run import linit_for
from cbd.run import run_plan
from cbd.store.anchors import tokenizer_dir
from cbd.train.models import build_model
from worker.queue import queue_for

EMBED = "model.embed_tokens.weight"  # the random chain is llama-family

ARCH = dict(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
SMALL = BridgeOptions(steps=12, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2, corpus="austen",
                      eval_batches=2, eval_batch_size=2, eval_seq_len=64)


def _plan(chain, opts: BridgeOptions, tokenizer: str = "gpt2", arch: dict | None = None):
    req = InitRequest(chain=chain.name, architecture=arch or ARCH, tokenizer=tokenizer)
    return make_plan(req, chain, bridge_options=opts)


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("bridge_artifacts")


@pytest.fixture(scope="module")
def fvt_only(random_chain, store):
    plan = _plan(random_chain, SMALL.model_copy(update={"steps": 0}))
    return plan, run_plan(plan, artifacts_root=store)


@pytest.fixture(scope="module")
def bridged(random_chain, store):
    plan = _plan(random_chain, SMALL)
    events = []
    info = run_plan(plan, artifacts_root=store, progress=events.append)
    return plan, info, events


# ---- pure pieces ------------------------------------------------------------------------------
def test_token_bytes_undo_the_byte_level_alphabet(gpt2):
    raw = token_bytes(gpt2)
    assert raw[gpt2.convert_tokens_to_ids("Ġthe")] == b" the"
    ids = gpt2("’", add_special_tokens=False).input_ids  # one character, two byte tokens
    assert len(ids) == 2 and b"".join(raw[i] for i in ids) == "’".encode()
    assert raw[gpt2.eos_token_id] is None  # special: no text


def test_uld_topk_equals_sorted_l1_when_k_covers_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    p_s, p_t = torch.randn(5, 7, generator=g).softmax(-1), torch.randn(5, 11, generator=g).softmax(-1)
    exact = (torch.nn.functional.pad(p_s.sort(-1, descending=True).values, (0, 4))
             - p_t.sort(-1, descending=True).values).abs().sum(-1).mean()
    assert torch.allclose(uld_loss(p_s, p_t, k=11), exact)
    assert uld_loss(p_s, p_t, k=3) <= exact + 1e-6  # top-k + tail: a lower bound
    assert float(uld_loss(p_t, p_t, k=4)) == 0.0


def test_matched_kl_is_the_kl_of_the_shared_tokens():
    g = torch.Generator().manual_seed(0)
    lq, lp = torch.randn(3, 6, generator=g).log_softmax(-1), torch.randn(3, 9, generator=g).log_softmax(-1)
    shared = (torch.tensor([0, 2, 5]), torch.tensor([8, 1, 4]))
    q, p = lq[:, shared[0]].softmax(-1), lp[:, shared[1]].softmax(-1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    assert torch.allclose(matched_kl(lq, lp, shared), want, atol=1e-6)
    assert float(matched_kl(lq, lq, (shared[0], shared[0]))) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("logit_loss", ["matched-kl", "uld"])
def test_bridge_loss_is_ce_plus_the_logit_loss_on_aligned_positions(logit_loss):
    g = torch.Generator().manual_seed(0)
    s_logits = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    t_logits, targets = torch.randn(2, 6, 9, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    pairs, shared = torch.tensor([[0, 1, 2], [1, 4, 5]]), (torch.tensor([0, 3]), torch.tensor([8, 2]))
    opts = BridgeOptions(logit_loss=logit_loss, logit_weight=0.5, uld_topk=9)
    loss, parts = bridge_loss(s_logits, targets, t_logits, pairs, opts, shared)
    ce = torch.nn.functional.cross_entropy(s_logits.flatten(0, 1), targets.flatten())
    s_rows, t_rows = s_logits[pairs[:, 0], pairs[:, 1]], t_logits[pairs[:, 0], pairs[:, 2]]
    kd = matched_kl(s_rows, t_rows, shared) if logit_loss == "matched-kl" else \
        uld_loss(s_rows.softmax(-1), t_rows.softmax(-1), k=9)
    assert torch.allclose(loss, ce + 0.5 * kd, atol=1e-6) and parts[logit_loss] == pytest.approx(float(kd.detach()), abs=1e-6)
    loss.backward()
    assert torch.isfinite(s_logits.grad).all() and s_logits.grad.abs().sum() > 0


def test_aligned_positions_have_seen_the_same_text(gpt2):
    smol = load_tokenizer("smollm2")
    text = "It was a truth universally acknowledged, that a single man’s fortune — “in want” — of a wife. " * 40
    data = BridgeData(text, gpt2, smol, batch_size=2, seq_len=48, seed=1)
    b = data.batch(0)
    assert b.student.shape == (2, 49) and len(b.pairs) > 0.8 * 2 * 48
    for row, i, j in b.pairs.tolist():
        assert gpt2.decode(b.student[row, : i + 1], clean_up_tokenization_spaces=False) == \
            smol.decode(b.teacher[row, : j + 1], clean_up_tokenization_spaces=False)
    again = data.batch(0)
    assert torch.equal(again.student, b.student) and torch.equal(again.pairs, b.pairs)


def test_bridge_plans_are_slow_and_hash_their_options(random_chain):
    a, b = _plan(random_chain, SMALL), _plan(random_chain, SMALL.model_copy(update={"steps": 13}))
    assert a.bridge and queue_for(a) == "slow" and a.bridge_options == SMALL and a.id != b.id
    same = make_plan(InitRequest(chain="test", architecture=ARCH), random_chain)
    assert not same.bridge and same.bridge_options is None


def test_the_operators_bridge_budget_makes_the_services_bridge_plans(random_chain):
    """``CBD_BRIDGE_STEPS`` sets a bridge job's steps (the service's plans use it, and it is in their
    id); unset, the defaults; a plan in the chain's own tokenizer does not change."""
    from app.core.config import Settings

    assert Settings.from_env({}).bridge_options() is None
    opts = Settings.from_env({"CBD_BRIDGE_STEPS": "30"}).bridge_options()
    assert opts == BridgeOptions(steps=30)
    with pytest.raises(ValueError, match="bridge_steps"):
        Settings.from_env({"CBD_BRIDGE_STEPS": "-1"})
    body = InitRequest(chain="test", architecture=ARCH, tokenizer="gpt2")
    short, default = make_plan(body, random_chain, bridge_options=opts), make_plan(body, random_chain)
    assert short.bridge_options.steps == 30 and default.bridge_options.steps == 120 and short.id != default.id
    own = InitRequest(chain="test", architecture=ARCH)
    assert make_plan(own, random_chain, bridge_options=opts) == make_plan(own, random_chain)


def test_fvt_pieces_spell_each_token_under_a_byte_level_chain(gpt2):
    smol = load_tokenizer("smollm2")  # the real chain tokenizer
    vm = vocab_map(gpt2, smol, vocab_size=50304)
    raw, chain_raw = token_bytes(gpt2), token_bytes(smol)
    for i in range(0, len(gpt2) - 1, 41):  # lossless: the pieces spell the token's bytes, half characters too
        assert b"".join(chain_raw[c] for c in vm.pieces[i]) == raw[i], gpt2.convert_ids_to_tokens(i)
    assert vm.stats["partial_characters"] > 100 and vm.special == {gpt2.eos_token_id: smol.eos_token_id}
    rows = torch.randn(len(smol), 8, generator=torch.Generator().manual_seed(0))
    out = fvt(rows, vm)
    multi = [i for i, p in enumerate(vm.pieces) if len(set(p)) > 1][:20]
    assert len(multi) == 20
    for i in multi:
        assert torch.allclose(out[i], rows[vm.pieces[i]].mean(0), atol=1e-6)


# ---- FVT ---------------------------------------------------------------------------------------
def test_fvt_rows_are_the_mean_of_the_pieces(random_chain, fvt_only, gpt2, store):
    plan, info = fvt_only
    chain_tok = AutoTokenizer.from_pretrained(tokenizer_dir(random_chain))
    chain_rows = linit_for(plan, random_chain).tensor(EMBED, info.alpha)  # alpha may be calibrated
    with safe_open(str(artifact_dir(plan.id, store) / "model.safetensors"), "pt") as f:
        rows = f.get_tensor(EMBED)
    for word in ("Ġthe", "Ġman", "Hello", "Ġwould", "'s"):  # "'s": two pieces (both unknown words)
        tid = gpt2.convert_tokens_to_ids(word)
        pieces = chain_tok(gpt2.decode([tid]), add_special_tokens=False).input_ids
        assert torch.allclose(rows[tid], chain_rows[pieces].mean(0), atol=1e-6), word
    eos = random_chain.base.eos_token_id
    assert torch.equal(rows[gpt2.eos_token_id], chain_rows[eos])  # special tokens keep their role's row
    assert torch.allclose(rows[len(gpt2):], chain_rows.mean(0).expand(rows.shape[0] - len(gpt2), -1))
    stats = info.metrics["bridge"]["vocab"]
    assert stats["vocab_size"] == 50304 and stats["padding_rows"] == 47 and stats["special_mapped"] == 1


def test_llama3_bos_and_eos_get_their_own_rows(random_chain, tmp_path):
    plan = _plan(random_chain, SMALL.model_copy(update={"steps": 0}), tokenizer="llama3",
                 arch=dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1))
    info = run_plan(plan, artifacts_root=tmp_path)
    folder = artifact_dir(plan.id, tmp_path)
    chain_rows = linit_for(plan, random_chain).tensor(EMBED, info.alpha)  # alpha may be calibrated
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        rows = f.get_tensor(EMBED)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vocab_size"] == 128256 and (cfg["bos_token_id"], cfg["eos_token_id"]) == (128000, 128001)
    assert torch.equal(rows[128000], chain_rows[random_chain.base.bos_token_id])
    assert torch.equal(rows[128001], chain_rows[random_chain.base.eos_token_id])


# ---- the published checkpoint ------------------------------------------------------------------
def test_checkpoint_loads_with_the_target_tokenizer(bridged, gpt2, store):
    plan, info, _ = bridged
    folder = artifact_dir(plan.id, store)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert len(tok) == len(gpt2) == 50257 and tok.eos_token_id == 50256
    cfg = model.config
    assert cfg.vocab_size == 50304 and cfg.vocab_size % 64 == 0 and cfg.eos_token_id == cfg.bos_token_id == 50256
    assert model.get_input_embeddings().weight.shape == (50304, 64)
    spec = bridge_spec(plan.target, gpt2, 64)
    assert sum(p.numel() for p in model.parameters()) == spec.num_params()
    ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    recipe = json.loads((folder / "recipe.json").read_text())
    assert recipe["bridge"]["method"] == "fvt+matched-kl+ce" and recipe["bridge"]["steps"] == SMALL.steps
    assert recipe["target"]["vocab_size"] == 50304 and recipe["request"]["tokenizer"] == "gpt2"
    card = (folder / "README.md").read_text()
    assert "## Bridge to tokenizer `gpt2`" in card and "padded to 50,304" in card


def test_bridge_training_lowers_heldout_loss(bridged, fvt_only, store):
    """Recomputed here (stock transformers on the published folders, the bridge's held-out GPT-2
    tokens): the bridged checkpoint beats the FVT-only one (same plan, 0 bridge steps), and each
    file is the one the job's summary measured."""
    plan, info, events = bridged
    plan0, info0 = fvt_only
    m = info.metrics["bridge"]
    heldout = heldout_batches(SMALL.corpus, "gpt2", plan.bridge_options)
    loss = folder_nll(artifact_dir(plan.id, store), heldout)
    loss_fvt = folder_nll(artifact_dir(plan0.id, store), heldout)
    assert info0.alpha == info.alpha and plan0.small == plan.small and plan0.big == plan.big  # same LInit
    assert loss < loss_fvt - 0.1, (loss, loss_fvt)
    assert (loss, loss_fvt) == pytest.approx((m["heldout_loss"], m["heldout_loss_fvt"]), abs=2e-3), m
    assert m["tokens"] == SMALL.steps * SMALL.batch_size * SMALL.seq_len and m["teacher_tokens"] > 0
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and events[-1] == {"stage": "done", "fraction": 1.0}
    assert sum(1 for e in events if e["stage"] == "bridge distillation") == SMALL.steps


def test_same_plan_same_bytes_and_cached(random_chain, bridged, store, tmp_path):
    plan, info, _ = bridged
    again = run_plan(plan, artifacts_root=tmp_path)
    assert again.files == info.files  # every file's size and sha256
    assert run_plan(plan, artifacts_root=store).created == info.created  # cached by plan id


# ---- the real chain, through the service ------------------------------------------------------
SERVICE_DB = 10
BRIDGE_STEPS = 30  # CBD_BRIDGE_STEPS of the service below
REAL_ARCH = dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=1024)  # 28.8M parameters with GPT-2's vocabulary (19.3M: the tied embedding)


def worker_cpu_s(proc) -> float:
    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


def download(client: httpx.Client, files: dict, folder: Path) -> None:
    """Every file the API lists, by its URL, checked against the size and sha256 it states."""
    folder.mkdir(parents=True)
    for name, link in files.items():
        data = client.get(link["url"]).content
        assert (len(data), hashlib.sha256(data).hexdigest()) == (link["size"], link["sha256"]), name
        (folder / name).write_bytes(data)


@pytest.mark.slow
@pytest.mark.teacher
@pytest.mark.timeout(3600)
def test_real_tiny_chain_bridge_to_gpt2_through_the_service(tiny_chain, redis_server, children, tmp_path):  # noqa: F811
    """POST a ~29M GPT-2-tokenizer target on the real `tiny` chain (built for the session) to the API;
    a real worker runs the bridge; the files downloaded from the API load in transformers, and,
    recomputed here with stock transformers on held-out GPT-2 tokens, the checkpoint beats a random
    init by far and an FVT-only checkpoint of the same plan (0 bridge steps)."""
    manifest, root = tiny_chain
    env = {"CBD_CHAINS": str(root), "CBD_ARTIFACTS": str(tmp_path / "artifacts")}  # the real chain, our store
    # the operator's bridge budget: 30 steps instead of 120 (a quarter of the suite's longest job; the
    # gain over FVT alone is still several times the margin asserted below: docs/bridge.md)
    url = redis_db(redis_server, SERVICE_DB)
    # the worker is the only busy process while the job runs (this one polls): it gets every core, as
    # `cbd serve` gives its one worker (cbd.core.threads), not the one thread of side-by-side test children
    threads = str(usable_cpus())
    worker = children.worker(url, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **env)
    base, _ = children.api(url, CBD_SYNC_WAIT_S="0", CBD_BRIDGE_STEPS=str(BRIDGE_STEPS), **env)
    with httpx.Client(base_url=base, timeout=60) as client:
        deadline = time.monotonic() + 300
        while client.get("/healthz").json().get("workers", 0) < 1:  # the worker is up: its start-up is not timed
            assert time.monotonic() < deadline and worker.poll() is None, children.log()
            time.sleep(0.5)
        body = {"chain": "tiny", "architecture": REAL_ARCH, "tokenizer": "gpt2"}
        cpu0, t0 = worker_cpu_s(worker), time.perf_counter()
        r = client.post("/initialize", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["id"] and job["queue"] == "slow" and r.headers["location"] == f"/jobs/{job['id']}"
        seen = []
        while job["status"] not in ("finished", "failed"):
            assert worker.poll() is None, children.log()  # bounded by the test's timeout, not a speed floor
            time.sleep(1.0)
            job = client.get(r.headers["location"]).json()
            if job.get("progress"):
                seen.append((job["progress"].get("stage"), job["progress"].get("fraction")))
        wall, cpu = time.perf_counter() - t0, worker_cpu_s(worker) - cpu0
        assert job["status"] == "finished", (job, children.log())
        download(client, job["files"], tmp_path / "ckpt")
    assert any(0 < f < 1 for _, f in seen), seen  # progress was reported while it ran
    assert "bridge distillation" in {s for s, _ in seen}, seen

    plan = make_plan(InitRequest.model_validate(body), manifest,  # the plan the API made: same id
                     bridge_options=BridgeOptions(steps=BRIDGE_STEPS))
    assert plan.id == job["id"] and plan.bridge and plan.id != make_plan(InitRequest.model_validate(body), manifest).id
    gpt2 = load_tokenizer("gpt2")
    folder = tmp_path / "ckpt"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    text = "It is a truth universally acknowledged — “Persuasion”, 1817."
    assert len(tok) == len(gpt2) == 50257 and tok.eos_token_id == gpt2.eos_token_id == 50256
    assert tok(text).input_ids == gpt2(text).input_ids  # GPT-2's tokenizer, not the chain's
    assert model.config.vocab_size == 50304 and model.config.eos_token_id == 50256
    assert 25e6 < sum(p.numel() for p in model.parameters()) < 35e6  # "about 30M"

    # FVT alone: the same plan with 0 bridge steps (the API takes no bridge options), run here.
    opts = plan.bridge_options
    plan0 = make_plan(InitRequest.model_validate(body), manifest, bridge_options=opts.model_copy(update={"steps": 0}))
    fvt_info = run_plan(plan0, chains_root=root, artifacts_root=tmp_path / "fvt")
    m = json.loads((folder / "recipe.json").read_text())["bridge"]  # what the job says it measured
    assert m["steps"] == BRIDGE_STEPS, m
    heldout = heldout_batches(m["corpora"], "gpt2", opts)  # held-out text in GPT-2 tokens, every corpus of the mix
    loss = nll(model, heldout)
    loss_fvt = folder_nll(artifact_dir(fvt_info.id, tmp_path / "fvt"), heldout)
    random_loss = random_init_nll(folder, heldout)
    print(f"bridge job: {wall:.0f} s wall, {cpu:.0f} CPU s (bench/bridge.py measures cost); held-out "
          f"{loss:.4f} vs FVT alone {loss_fvt:.4f} and random {random_loss:.4f}")
    assert loss < random_loss - 3.0, (loss, random_loss)
    assert loss < loss_fvt - 0.2, (loss, loss_fvt)  # the bridge run buys more than FVT alone
    assert (loss, loss_fvt) == pytest.approx((m["heldout_loss"], m["heldout_loss_fvt"]), abs=2e-3), m  # as reported


# ---- a foreign source: Gemma writes, an anchor zero of the chain's family learns ----------------
def test_gemma_teaches_an_anchor_zero_by_sequence_kd():
    from random_chain import tiny_spec

    from cbd.data.teachers import gemma_dir
    from cbd.errors import AssetUnavailableError
    from cbd.shape import arch

    try:
        gemma_dir()
    except AssetUnavailableError as exc:
        pytest.skip(f"Gemma-3-270M is not available: {exc}")
    smol = load_tokenizer("smollm2")
    spec = tiny_spec(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=16, intermediate_size=48, vocab_size=len(smol))
    opts = SeqKDOptions(prompts=2, prompt_words=8, new_tokens=12, gen_batch=2, steps=6, batch_size=2,
                               seq_len=16, lr=3e-3, warmup_steps=1)
    state, m = foreign_anchor_zero(spec, smol, "austen", opts)
    assert {n: tuple(t.shape) for n, t in state.items()} == {n: arch.tensor_shape(spec, n)
                                                              for n in arch.param_names(spec)}
    prompt = corpus_prompts(corpus_text("austen"), 2, 8, 0)[0]
    assert m["sample"].startswith(prompt) and len(m["sample"]) > len(prompt)  # Gemma continued it
    assert m["teacher_tokens"] >= 2 * 12 and m["steps"] == 6
    assert m["train_loss_last"] < m["train_loss_first"]


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_embeddings_only_bridge_trains_the_vocabulary_rows_of_either_family(family, tie):
    from random_chain import tiny_gpt2_spec, tiny_spec

    from cbd.bridge.train import trainable

    spec = (tiny_spec if family == "llama" else tiny_gpt2_spec)(tie_word_embeddings=tie)
    student = build_model(spec, seed=0)
    params = trainable(student, "embeddings")
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    embed = "model.embed_tokens.weight" if family == "llama" else "transformer.wte.weight"
    assert names == ({embed} if tie else {embed, "lm_head.weight"})
    assert len(params) == len(names)
    assert len(trainable(build_model(spec, seed=0), "all")) == len(list(student.parameters()))
