"""The init card and the per-block alpha, on the random test chain, read back from published files.

Every checkpoint says what it starts from: its step-0 loss on the chain's validation batch beside
each single anchor's and a random init's. Those numbers are recomputed here from the published
``model.safetensors`` (not trusted from the job), and the per-block alpha is checked never to lose
to the global alpha it starts from.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

import cbd.inits.run as runner
from cbd.core.artifacts import artifact_dir
from cbd.core.files import canonical_json
from cbd.core.plan import FORMAT_VERSION, make_plan
from cbd.core.request import InitRequest
from cbd.inits import calibration
from cbd.inits.calibration import (
    BLOCK_STEPS,
    block_values,
    calibrate_blocks,
    layer_blocks,
    validation_batches,
)
from cbd.inits.run import linit_for
from cbd.run import run_plan
from cbd.shape import arch
from cbd.shape.linit import alpha_group
from cbd.train.models import eval_loss, mean_nll, random_state, state_loss

ARCH = dict(num_hidden_layers=3, hidden_size=80, num_attention_heads=5, num_key_value_heads=1, intermediate_size=72)


@pytest.fixture(scope="module")
def made(random_chain, cbd_home, tmp_path_factory):
    """(plan, artifact folder) for each alpha scheme of the same target."""
    out = {}
    root = tmp_path_factory.mktemp("card_artifacts")
    for scheme in ("blocks", "global"):
        plan = make_plan(InitRequest(chain="test", architecture=ARCH, alpha_scheme=scheme), random_chain)
        run_plan(plan, chains_root=cbd_home / "chains", artifacts_root=root)
        out[scheme] = plan, artifact_dir(plan.id, root)
    return out


@pytest.mark.parametrize("scheme", ["blocks", "global"])
def test_card_losses_are_those_of_the_published_files(made, random_chain, cbd_home, scheme):
    plan, folder = made[scheme]
    info = json.loads((folder / "artifact.json").read_text())
    card = info["metrics"]["card"]
    batches = validation_batches(random_chain, cbd_home / "chains")
    assert card["alpha_scheme"] == scheme and card["repair"] == "ridge"
    assert card["validation"]["tokens"] == sum(b[:, 1:].numel() for b in batches)
    # the published weights, evaluated afresh, have the loss the card states
    state = load_file(str(folder / "model.safetensors"))
    assert state_loss(plan.target, state, batches) == pytest.approx(card["step0_loss"], abs=2e-4)
    # each single anchor's figure is that anchor's Trans onto the target (alpha 1: S, 0: B), repaired
    li = linit_for(plan, random_chain, cbd_home / "chains")
    from cbd.inits.calibration import repair_terms

    repair_terms(li, {"small": plan.small, "big": plan.big}, random_chain, cbd_home / "chains")
    for term, alpha in (("small", 1.0), ("big", 0.0)):
        got = card["single_anchors"][term]
        assert got["anchor"] == getattr(plan, term) and got["alpha"] == alpha
        assert state_loss(plan.target, li.state(alpha), batches) == pytest.approx(got["loss"], abs=2e-4)
    best = min(x["loss"] for x in card["single_anchors"].values())
    assert card["best_single_anchor"]["loss"] == best
    assert card["step0_loss"] <= best + 1e-4  # calibration includes both single anchors
    assert card["gain_over_best_single_anchor"] == pytest.approx(best - card["step0_loss"], abs=2e-4)
    assert card["random_init_loss"] > 0
    readme = (folder / "README.md").read_text()
    assert "## Loss at step 0" in readme and f"{card['step0_loss']:.4f}" in readme


def test_blocks_never_lose_to_the_global_alpha(made):
    (_, blocks), (_, glob) = made["blocks"], made["global"]
    cb = json.loads((blocks / "artifact.json").read_text())["metrics"]
    cg = json.loads((glob / "artifact.json").read_text())["metrics"]
    assert cb["card"]["step0_loss"] <= cg["card"]["step0_loss"] + 1e-6
    assert set(cb["alphas"]) == {"outer"} | {f"L{j}" for j in range(ARCH["num_hidden_layers"])}
    # the start and 2 other values x (outer + 3 blocks) over half the batch, one sweep, then the
    # result in float32 over the whole batch and the check (start and result over the other half)
    assert cb["alphas_passes"] <= (1 + 2 * (1 + 3)) + 1 + 2
    # each group keeps the grid's best or moves one of the service's steps from it
    alpha = float(json.loads((blocks / "artifact.json").read_text())["alpha"])  # the grid's best
    assert cb["alphas_search"]["moves"] == list(BLOCK_STEPS) and cb["alphas_search"]["blocks"] == 3
    assert set(cb["alphas"].values()) <= {float(alpha), *block_values(float(alpha))}


def test_the_search_gives_big_targets_fewer_blocks_within_its_budget():
    """search_blocks: one block per layer for small targets (up to SEARCH_BLOCKS), fewer as a pass
    grows, never none; the budget holds for every answer but the floor of one block."""
    from cbd.core.spec import make_spec
    from cbd.inits.calibration import SEARCH_BLOCKS, SEARCH_BUDGET_MACS, search_blocks

    base = make_spec(dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                          intermediate_size=1536, vocab_size=49152))
    got = {}
    for shape in [(12, 256, 4, 2, 704), (14, 320, 5, 1, 896), (16, 448, 7, 1, 1280), (24, 512, 8, 4, 1280),
                  (28, 576, 9, 3, 1536), (3, 64, 1, 1, 128)]:
        t = base.with_shape(num_hidden_layers=shape[0], hidden_size=shape[1], num_attention_heads=shape[2],
                            num_key_value_heads=shape[3], intermediate_size=shape[4])
        k = search_blocks(t, 1024)
        per_pass = (t.non_embedding_params() + t.vocab_size * t.hidden_size) * 512
        assert 1 <= k <= min(SEARCH_BLOCKS, t.num_hidden_layers)
        assert k == 1 or (k + 1) * len(BLOCK_STEPS) * per_pass <= SEARCH_BUDGET_MACS
        assert k == min(SEARCH_BLOCKS, t.num_hidden_layers) or (k + 2) * len(BLOCK_STEPS) * per_pass > SEARCH_BUDGET_MACS
        got[shape[:2]] = k
    assert got == {(12, 256): 12, (14, 320): 12, (16, 448): 6, (24, 512): 3, (28, 576): 2, (3, 64): 3}
    assert search_blocks(base, 10**9) == 1  # the floor


@pytest.mark.parametrize("alpha,want", [(0.5, (0.375, 0.625)), (0.0, (0.125,)), (1.0, (0.875,)),
                                        (0.125, (0.0, 0.25))])
def test_block_moves_are_the_steps_around_the_start_within_0_and_1(alpha, want):
    assert block_values(alpha) == want
    assert block_values(0.5, (-0.25, 0.25, 0.75)) == (0.25, 0.75, 1.0)


def test_block_alphas_apply_per_group(random_chain, cbd_home):
    """A hand-set alpha per group gives each tensor its group's blend, and the coordinate descent's
    reported loss is the loss of the state it returns."""
    plan = make_plan(InitRequest(chain="test", architecture=ARCH, repair=False), random_chain)
    li = linit_for(plan, random_chain, cbd_home / "chains")
    alphas = {"outer": 0.0, "L0": 1.0, "L1": 0.5, "L2": 0.0}
    mixed, small, big = li.state(alphas), li.state(1.0), li.state(0.0)
    for name, t in mixed.items():
        want = {0.0: big, 1.0: small}.get(alphas[alpha_group(name)])
        if want is not None:
            assert t.equal(want[name]), name
        else:
            assert t.allclose(0.5 * small[name] + 0.5 * big[name], atol=1e-6), name
    batches = validation_batches(random_chain, cbd_home / "chains")
    base = state_loss(plan.target, li.state(0.5), batches)
    found, loss, _ = calibrate_blocks(li, batches, 0.5, base)
    assert loss <= base
    assert state_loss(plan.target, li.state(found), batches) == pytest.approx(loss, abs=1e-5)
    assert layer_blocks(10, 4) == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]


def test_blend_losses_are_those_of_linit_states(random_chain, cbd_home):
    """Calibration scores every candidate on one model whose parameters are set to the blend of the
    two terms (cbd.inits.calibration.Blend): each loss equals the loss of ``LInit.state`` at the
    same alpha, for one alpha and per group, with both terms repaired; repeats are not re-measured."""
    from cbd.inits.calibration import Blend, repair_terms

    plan = make_plan(InitRequest(chain="test", architecture=ARCH), random_chain)
    li = linit_for(plan, random_chain, cbd_home / "chains")
    measured = {}
    done = repair_terms(li, {"small": plan.small, "big": plan.big}, random_chain, cbd_home / "chains", measured)
    batches = validation_batches(random_chain, cbd_home / "chains")
    blend = Blend(li, batches)
    per_group = {"outer": 0.3, "L0": 1.0, "L1": 0.0, "L2": 0.5}
    for a in (0.0, 0.3, 1.0, per_group):
        assert blend.loss(a) == pytest.approx(state_loss(plan.target, li.state(a), batches), abs=1e-6), a
    passes = blend.passes
    assert blend.loss(0.3) == blend.loss(0.3) and blend.passes == passes
    # the repair's own measurement of a repaired term is the loss of that term alone, per batch
    assert done and measured
    for a, sums in measured.items():
        assert len(sums) == len(batches)
        assert mean_nll(sums) == pytest.approx(state_loss(plan.target, li.state(a), batches), abs=1e-6)


def test_a_part_of_the_batch_already_measured_is_not_run_again(random_chain, cbd_home):
    """The per-block search's check scores the start and the result on half of the validation batch:
    where a full float32 pass at that alpha (or the repair's check of a term) has run, its per-batch
    sums give the half's loss with no pass, and that loss is ``eval_loss`` of the half, bit for bit."""
    from cbd.inits.calibration import Blend, repair_terms

    plan = make_plan(InitRequest(chain="test", architecture=ARCH), random_chain)
    li = linit_for(plan, random_chain, cbd_home / "chains")
    measured = {}
    repair_terms(li, {"small": plan.small, "big": plan.big}, random_chain, cbd_home / "chains", measured)
    batches = validation_batches(random_chain, cbd_home / "chains")
    batches = batches if len(batches) >= 2 else list(torch.cat(batches).split(1))
    blend = Blend(li, batches)
    blend.remember(measured)
    half = batches[1::2]
    for a in (0.3, {"outer": 0.3, "L0": 1.0, "L1": 0.0, "L2": 0.5}):
        whole = blend.loss(a)
        passes = blend.passes
        got = blend.loss_on(a, half)
        assert blend.passes == passes  # read off the full pass
        blend.set(a)
        assert got == eval_loss(blend.model, half, chunked=True)
        assert whole == eval_loss(blend.model, batches, chunked=True)
    for a in measured:  # the repaired terms: measured by the repair, never by the blend
        assert blend.loss_on(a, half) == pytest.approx(state_loss(plan.target, li.state(a), half), abs=1e-6)
    assert blend.passes == passes
    assert blend.loss_on(0.6, half) > 0 and blend.passes == passes + 1  # new: one pass, over the half only


def test_anchor_outputs_are_cached_beside_the_chain_and_give_the_same_repair(random_chain, cbd_home):
    """The repair's anchor pass is cached per anchor and calibration batch (cbd.inits.calibration.
    anchor_cache): a second request reads the file instead of running the anchor and repairs to
    the same tensors bit for bit; a damaged file is never trusted, it is recomputed and replaced."""
    import os

    import torch

    from cbd.inits.calibration import repair_terms

    plan = make_plan(InitRequest(chain="test", architecture=ARCH), random_chain)
    names = {"small": plan.small, "big": plan.big}
    folder = cbd_home / "chains" / ".anchor-outputs"

    def repaired() -> dict:
        li = linit_for(plan, random_chain, cbd_home / "chains")
        repair_terms(li, names, random_chain, cbd_home / "chains")
        return li.replaced

    for f in folder.glob("*") if folder.exists() else []:
        f.unlink()
    first = repaired()
    assert first, "this target prunes the bigger anchor: something is refit"
    tag = linit_for(plan, random_chain, cbd_home / "chains").big.tag  # a0 as the request maps it (rotated)
    files = sorted(folder.glob(f"test.{plan.big}.{tag}.*.in.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    stamp = files[0].stat().st_mtime_ns

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(a[t].keys() == b[t].keys() and all(torch.equal(a[t][k], b[t][k])
                                                                                for k in a[t]) for t in a)

    assert same(repaired(), first) and files[0].stat().st_mtime_ns == stamp  # read, not rewritten
    # with the outputs cached, the repair reads (and, the anchor being rotated, rotates) only the
    # tensors of the layers the target keeps and the global ones, never a dropped layer's
    li = linit_for(plan, random_chain, cbd_home / "chains")
    kept, read, was = set(li.maps_big.layers.idx), [], li.big.read
    assert len(kept) < li.big.spec.num_hidden_layers  # this target drops layers of a0
    li.big.read = lambda n: read.append(n) or was(n)
    repair_terms(li, names, random_chain, cbd_home / "chains")
    assert same(li.replaced, first)
    layers = {arch.split_name(n)[0] for n in read}
    assert read and layers - {None} <= kept, sorted(layers - {None} - kept)
    # a refit global tensor (the final norm, where the residual width is pruned) is read through Trans
    # like a layer's: the target's norm is the refit weight gathered by the residual map
    li = linit_for(plan, random_chain, cbd_home / "chains")
    assert len(li.maps_big.resid.idx) < li.big.spec.hidden_size  # this target drops channels of a0
    refit = torch.arange(li.big.spec.hidden_size, dtype=torch.float32) + 0.5
    li.replaced = {"big": {(None, "model.norm.weight"): refit}}
    assert torch.equal(li.state(0.0)["model.norm.weight"], refit[torch.tensor(li.maps_big.resid.idx)])
    with open(files[0], "r+b") as f:  # damaged: a truncated copy
        f.truncate(os.path.getsize(files[0]) // 2)
    assert same(repaired(), first)
    assert files[0].stat().st_size > 0 and files[0].stat().st_mtime_ns != stamp  # recomputed and replaced


def test_search_passes_run_only_the_changed_layers_and_match_a_full_pass(random_chain, cbd_home):
    """The per-block search's passes (``Blend.loss(.., search=True)``, float32 here) start from the
    hidden states a recent pass computed before the first layer whose alpha differs: the loss is
    the full pass's bit for bit, in any order of points (groups set back and forth), and fewer
    layers run than full passes would."""
    from cbd.inits.calibration import Blend

    plan = make_plan(InitRequest(chain="test", architecture=ARCH, repair=False), random_chain)
    li = linit_for(plan, random_chain, cbd_home / "chains")
    batches = validation_batches(random_chain, cbd_home / "chains")
    blend = Blend(li, batches, bf16=False)

    def point(outer, *layers):
        return {"outer": outer} | {f"L{j}": a for j, a in enumerate(layers)}

    points = [point(0.5, 0.5, 0.5, 0.5), point(0.5, 0.5, 0.5, 1.0), point(0.5, 0.5, 0.0, 0.5),
              point(0.5, 0.5, 0.0, 0.0), point(1.0, 0.5, 0.0, 0.0), point(0.5, 0.5, 0.5, 0.0),
              point(0.5, 1.0, 0.0, 0.0), point(0.5, 0.5, 0.5, 0.5)]
    for p in points:
        assert blend.loss(p, search=True) == state_loss(plan.target, li.state(p), batches), p
    full = len(set(map(Blend.key, points))) * len(batches) * ARCH["num_hidden_layers"]
    assert blend.layers_run < full


def test_a_bf16_search_keeps_only_what_float32_confirms(random_chain, cbd_home):
    """With bf16 search passes the block search's result is measured again in float32: its reported
    loss is the float32 loss of the state it returns, never above the start's."""
    from cbd.inits.calibration import Blend

    plan = make_plan(InitRequest(chain="test", architecture=ARCH, repair=False), random_chain)
    li = linit_for(plan, random_chain, cbd_home / "chains")
    batches = validation_batches(random_chain, cbd_home / "chains")
    blend = Blend(li, batches, bf16=True)
    base = blend.loss(0.5)
    found, loss, passes = calibrate_blocks(li, batches, 0.5, base, blend=blend)
    assert loss <= base
    assert state_loss(plan.target, li.state(found), batches) == pytest.approx(loss, abs=1e-5)
    searched = blend.loss(0.5, search=True)
    assert searched != base and searched == pytest.approx(base, abs=0.05)  # another precision, close
    assert passes <= 1 + 3 * (1 + 3) + 1  # the start, values x groups, the float32 check


def test_the_half_block_search_is_kept_only_where_the_other_half_agrees(random_chain, cbd_home, monkeypatch):
    """``"half"``: the per-block search runs on every other validation batch and its result must also
    beat the start on the rest, in float32. Kept, it does (and beats it on the whole batch); where the
    other half says the blocks lose, the start comes back. The half's view shares the model with the
    blend: losses measured after it are still those of ``LInit.state``."""
    from cbd.inits.calibration import Blend

    plan = make_plan(InitRequest(chain="test", architecture=ARCH, repair=False), random_chain)
    li = linit_for(plan, random_chain, cbd_home / "chains")
    batches = validation_batches(random_chain, cbd_home / "chains")
    batches = batches if len(batches) >= 2 else list(torch.cat(batches).split(1))
    assert len(batches) >= 2
    blend = Blend(li, batches)
    base = blend.loss(0.5)
    notes: dict = {}
    got, loss, passes = calibrate_blocks(li, batches, 0.5, base, blend=blend, check="half", notes=notes)
    assert len(set(got.values())) > 1 and notes["checks"]["first"]["kept"] is True, notes
    other = batches[1::2]
    assert state_loss(plan.target, li.state(got), other) < state_loss(plan.target, li.state(0.5), other)
    assert notes["checks"]["first"]["found"] == pytest.approx(state_loss(plan.target, li.state(got), other), abs=1e-4)
    assert loss < base and state_loss(plan.target, li.state(got), batches) == pytest.approx(loss, abs=1e-5)
    for a in (0.5, got, 1.0, got):  # the view set the shared model: the blend's own losses still hold
        blend.cache.clear()
        blend.sums.clear()
        assert blend.loss(a) == pytest.approx(state_loss(plan.target, li.state(a), batches), abs=1e-5)
    assert passes <= 1 + 3 * (1 + 3) + 1 + 2  # the start, values x groups, float32 on all, the check
    # the random chain's blocks win on every text tried (random tokens, the anchors' greedy text), so
    # a half where they lose is stood in for: its losses of any per-block blend raised by 100 nats
    measured = Blend.loss_on
    monkeypatch.setattr(Blend, "loss_on", lambda self, alpha, b: measured(self, alpha, b)
                        + (100.0 if isinstance(alpha, dict) and len(set(alpha.values())) > 1 else 0.0))
    notes = {}
    for mode in ("half", "twofold"):
        notes = {}
        back, back_loss, _ = calibrate_blocks(li, batches, 0.5, base, blend=Blend(li, batches), check=mode, notes=notes)
        assert set(back.values()) == {0.5} and back_loss == base
        assert notes["checks"] and all(not c["kept"] and c["found"] > c["start"] for c in notes["checks"].values())


def test_the_twofold_block_search_keeps_the_better_checked_half(random_chain, cbd_home):
    """``twofold`` (the service's): a search on each half, each checked on the other; of the results
    that pass, the one with the lower float32 loss on the whole batch. The answer is that result,
    at that loss."""
    from cbd.inits.calibration import Blend

    plan = make_plan(InitRequest(chain="test", architecture=ARCH, repair=False), random_chain)
    li = linit_for(plan, random_chain, cbd_home / "chains")
    batches = validation_batches(random_chain, cbd_home / "chains")
    batches = batches if len(batches) >= 2 else list(torch.cat(batches).split(1))
    blend = Blend(li, batches)
    base = blend.loss(0.5)
    notes: dict = {}
    got, loss, _ = calibrate_blocks(li, batches, 0.5, base, blend=blend, check="twofold", notes=notes)
    checks = notes["checks"]
    assert notes["check"] == "twofold" and set(checks) <= {"first", "second"} and checks
    kept = [c for c in checks.values() if c["kept"]]
    assert kept and all(c["found"] < c["start"] for c in kept)
    assert loss == pytest.approx(min(c["loss"] for c in kept), abs=1e-5) and loss < base
    assert state_loss(plan.target, li.state(got), batches) == pytest.approx(loss, abs=1e-5)
    half, _, _ = calibrate_blocks(li, batches, 0.5, base, blend=Blend(li, batches), check="half")
    assert loss <= state_loss(plan.target, li.state(half), batches) + 1e-5  # "half" is its first fold


@pytest.mark.parametrize("value,want", [("0", False), ("off", False), ("1", True), ("on", True)])
def test_search_precision_follows_the_setting(monkeypatch, value, want):
    from cbd.core.threads import cpu_has_bf16
    from cbd.inits.calibration import search_bf16

    monkeypatch.setenv("CBD_SEARCH_BF16", value)
    assert search_bf16() is want
    monkeypatch.setenv("CBD_SEARCH_BF16", "auto")
    assert search_bf16() is cpu_has_bf16()


def test_card_false_measures_nothing_and_makes_the_same_weights(made, random_chain, cbd_home, tmp_path, monkeypatch):
    """``"card": false`` skips the card's forward passes (no validation pass at all with calibrate
    and repair off), says so in the README, and is another checkpoint id; the weights are the ones
    the same request with the card makes, and a request with the card keeps the id it had before
    the field existed."""
    body = dict(chain="test", architecture=ARCH, calibrate=False, repair=False)
    with_card = make_plan(InitRequest(**body), random_chain)
    plan = make_plan(InitRequest(**body, card=False), random_chain)
    assert plan.id != with_card.id and not plan.card
    old = with_card.model_dump(mode="json", exclude={"id", "code_version", "card"})
    assert with_card.id == hashlib.sha256(canonical_json({"v": FORMAT_VERSION, **old}).encode()).hexdigest()[:32]

    def no_pass(*a, **k):
        raise AssertionError("a validation pass with card false")

    monkeypatch.setattr(calibration, "random_init_loss", no_pass)
    monkeypatch.setattr(runner, "validation_batches", no_pass)
    run_plan(plan, chains_root=cbd_home / "chains", artifacts_root=tmp_path / "a")
    monkeypatch.undo()
    run_plan(with_card, chains_root=cbd_home / "chains", artifacts_root=tmp_path / "b")
    a, b = artifact_dir(plan.id, tmp_path / "a"), artifact_dir(with_card.id, tmp_path / "b")
    info = json.loads((a / "artifact.json").read_text())
    assert "card" not in info["metrics"]
    assert "card" in json.loads((b / "artifact.json").read_text())["metrics"]
    assert "Not measured" in (a / "README.md").read_text()
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def test_random_init_loss_is_measured_once_per_shape_and_batch(random_chain, cbd_home, monkeypatch):
    from collections import OrderedDict

    from cbd.core.spec import make_spec

    monkeypatch.setattr(calibration, "_random_losses", OrderedDict())
    batches = validation_batches(random_chain, cbd_home / "chains")
    spec = make_plan(InitRequest(chain="test", architecture=ARCH), random_chain).target
    calls = []
    real = calibration.build_model
    monkeypatch.setattr(calibration, "build_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = calibration.random_init_loss(spec, batches)
    assert calibration.random_init_loss(spec, batches) == first
    assert first == pytest.approx(state_loss(spec, random_state(spec, seed=0), batches), abs=1e-6)
    other = make_spec(spec.model_dump() | {"intermediate_size": 64})
    calibration.random_init_loss(other, batches)
    calibration.random_init_loss(spec, batches[:1])
    assert [c[0] for c in calls] == [spec, other, spec]  # once per shape and batch


@pytest.mark.parametrize("blend", ["fade", "plain"])
def test_a_fading_grid_searches_its_interior_and_reports_float32(random_chain, cbd_home, blend):
    """The fading blend's loss is often lowest between the anchors, so its grid also searches the
    interior (``FADE_INTERIOR``, then halfway to the best one's neighbours) and keeps the best
    interior point, measured in float32 like every
    other grid point, instead of alpha0; the plain blend's grid is alpha0 and both ends."""
    from cbd.inits.calibration import FADE_INTERIOR, FADE_REFINE, Blend, grid_losses
    from cbd.shape.linit import alpha_grid

    plan = make_plan(InitRequest(chain="test", architecture=ARCH, blend=blend, repair=False), random_chain)
    li = linit_for(plan, random_chain, cbd_home / "chains")
    assert li.fades == (blend == "fade")
    batches = validation_batches(random_chain, cbd_home / "chains")
    blend_ = Blend(li, batches, bf16=True)
    scores = grid_losses(li, batches, blend_)
    if blend == "plain":
        assert set(scores) == set(alpha_grid(li.alpha))
    else:
        inner = set(scores) - {0.0, 1.0}
        searched = {a: v for (half, a), v in blend_.cache.items() if half}
        first = min(FADE_INTERIOR, key=searched.get)
        refine = {first - FADE_REFINE, first + FADE_REFINE}
        assert set(searched) == set(FADE_INTERIOR) | refine
        assert len(inner) == 1 and inner == {min(searched, key=searched.get)}
    for a, loss in scores.items():
        assert loss == pytest.approx(state_loss(plan.target, li.state(a), batches), abs=1e-6), a
