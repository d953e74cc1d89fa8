"""Carrying a pruned residual width (``cbd.repair.carry``): the channels a prune may drop are rotated
onto their principal directions first.

On tiny random llama-family models: the rotation keeps the model's function (exactly with an untied
head, and with a tied one where the final norm's weight is equal over the rotated channels), and
when what the dropped channels carry lies in fewer directions than the prune keeps, the rotated
prune plus the in-situ repair gives the anchor's logits back, where a prune by importance cannot.
A request records what the rotation did, and ``carry: "none"`` is the prune by importance.
"""

from __future__ import annotations

import pytest
import torch
from test_repair import _batch, _llama_spec, _perturbed

from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.inits import calibration
from cbd.inits.calibration import anchor_moment
from cbd.inits.run import linit_for, prepare
from cbd.repair.carry import (
    carried_importance,
    carry_rotation,
    fixed_channels,
    resid_moment,
    rotated_reader,
)
from cbd.repair.refit import insitu_repair
from cbd.shape import arch
from cbd.shape.importance import importance
from cbd.shape.maps import choose_maps
from cbd.shape.trans import trans_state
from cbd.train.models import build_model
from tests.test_init_card import ARCH


def _rotated(spec, state, carry):
    read = rotated_reader(spec, state.__getitem__, carry)
    return {n: read(n) for n in arch.param_names(spec)}


def _logits(spec, state, batch):
    with torch.no_grad():
        return build_model(spec, state)(batch).logits


SPECS = {"llama untied": dict(tie_word_embeddings=False), "qwen2 untied": dict(model_type="qwen2", tie_word_embeddings=False),
         "llama tied": {}}


@pytest.mark.parametrize("kind", list(SPECS))
def test_the_rotation_keeps_the_function(kind):
    spec = _llama_spec(**SPECS[kind])
    state = _perturbed(spec, 0)
    fixed = list(range(0, spec.hidden_size, 3))  # every third channel stays, the rest turn
    if kind == "llama tied":  # a tied head cannot take the final norm's weight: equal over the rotated ones
        g = state["model.norm.weight"].clone()
        g[[i for i in range(spec.hidden_size) if i not in fixed]] = 1.7
        state["model.norm.weight"] = g
    carry = carry_rotation(resid_moment(spec, state, [_batch(spec, 1)]), fixed)
    assert len(carry.rotated) == spec.hidden_size - len(fixed)
    q = carry.q
    assert torch.allclose(q @ q.T, torch.eye(len(q)), atol=1e-5)  # orthogonal
    assert bool((carry.energy[:-1] >= carry.energy[1:]).all()) and abs(float(carry.energy.sum()) - 1) < 1e-5
    rot = _rotated(spec, state, carry)
    held = _batch(spec, 7)
    full, turned = _logits(spec, state, held), _logits(spec, rot, held)
    assert (full - turned).abs().max() < 1e-4
    # it did turn something: the embedding's rotated columns changed, the fixed ones did not
    e, e2 = state["model.embed_tokens.weight"], rot["model.embed_tokens.weight"]
    assert torch.equal(e[:, fixed], e2[:, fixed]) and (e - e2).abs().max() > 1e-2


def test_a_tied_head_is_approximated_by_the_spread_of_the_final_norms_weight():
    """The tied head keeps the diagonal of Q diag(g) Q^T: exact where g is equal over the rotated
    channels, off by more the more it varies there (why the most important channels, the stream's
    outliers, stay fixed)."""
    spec = _llama_spec()
    base = _perturbed(spec, 0)
    fixed = list(range(0, spec.hidden_size, 3))
    turned = [i for i in range(spec.hidden_size) if i not in fixed]
    held = _batch(spec, 7)
    errs = []
    for spread in (0.0, 0.05, 0.5):
        state = dict(base)
        g = base["model.norm.weight"].clone()
        g[turned] = 1.5 + spread * torch.linspace(-1, 1, len(turned))
        state["model.norm.weight"] = g
        carry = carry_rotation(resid_moment(spec, state, [_batch(spec, 1)]), fixed)
        errs.append(float((_logits(spec, state, held) - _logits(spec, _rotated(spec, state, carry), held)).abs().max()))
    assert errs[0] < 1e-4 < errs[1] < errs[2], errs


def _few_directions(spec, state, chans, k, seed=0):
    """Every writer of the residual stream writes channels ``chans`` only along k directions: the
    stream's part there always lies in a k-dimensional subspace."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(len(chans), k, generator=g))[0]  # orthonormal columns
    out = {n: t.clone() for n, t in state.items()}
    e = out["model.embed_tokens.weight"]
    e[:, chans] = e[:, chans] @ u @ u.T
    for i in range(spec.num_hidden_layers):
        p = arch.layer_prefix(spec).format(i=i)
        for key in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            w = out[p + key]
            w[chans] = u @ u.T @ w[chans]
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_rotated_prune_keeps_what_the_dropped_channels_carried(model_type):
    """The 12 channels a prune to 42 of 48 may drop carry 6 directions: rotated, the prune keeps those
    6 and drops 6 silent ones, and the repair (which fixes the RMS the norms now divide by) gives the
    anchor's logits back; by importance it drops 6 channels that carry something, and cannot."""
    spec = _llama_spec(model_type=model_type, tie_word_embeddings=False)
    calib = _batch(spec, 1)
    imp = importance(build_model(spec, _perturbed(spec, 0)), spec, calib)
    width = 42
    fixed = fixed_channels(spec, width, imp)  # max(2 * 42 - 48, 21) = 36 most important
    assert len(fixed) == 36
    chans = [i for i in range(spec.hidden_size) if i not in fixed]
    state = _few_directions(spec, _perturbed(spec, 0), chans, k=6)
    tgt = spec.with_shape(hidden_size=width, head_dim=spec.head_dim)
    cal = [torch.cat([calib, calib[:, :1]], 1)]
    held = _batch(spec, 7)
    full = _logits(spec, state, held)

    carry = carry_rotation(resid_moment(spec, state, cal), fixed)
    assert carry.kept_energy(6) > 1 - 1e-5  # everything in the top 6 directions
    rot = _rotated(spec, state, carry)
    maps = choose_maps(spec, tgt, carried_importance(imp, spec.hidden_size, carry))
    assert set(fixed) <= set(maps.resid.idx)
    assert set(maps.resid.idx) - set(fixed) == set(carry.rotated[:6].tolist())  # the top directions' slots
    fixed_up, _ = insitu_repair(spec, rot, tgt, maps, cal, ridge=1e-10, guard=False)
    err = (full - _logits(tgt, fixed_up, held)).abs().max()

    by_imp = choose_maps(spec, tgt, imp)
    plain_up, _ = insitu_repair(spec, state, tgt, by_imp, cal, ridge=1e-10, guard=False)
    err_imp = (full - _logits(tgt, plain_up, held)).abs().max()
    plain = (full - _logits(tgt, trans_state(rot, spec, tgt, maps), held)).abs().max()
    assert err <= 1e-3, err
    assert err_imp > 1e-2, err_imp
    assert plain > 1e-2  # without the repair the RMS over fewer channels still moves every logit


def test_fixed_channels_are_the_aligned_ones_else_the_most_important():
    spec = _llama_spec()
    imp = {"resid": torch.arange(spec.hidden_size, dtype=torch.float32)}
    assert fixed_channels(spec, 40, imp, aligned=[5, 1, 3]) == [1, 3, 5]
    assert fixed_channels(spec, 40, imp) == list(range(16, 48))  # 2 * 40 - 48 = 32 most important
    assert fixed_channels(spec, 16, imp) == list(range(40, 48))  # never fewer than half the target
    assert fixed_channels(spec, 16, None) == []


def test_a_request_records_the_rotation_and_none_is_the_prune_by_importance(random_chain, cbd_home, monkeypatch):
    """ARCH (80 wide) lies between a0 (96) and a1 (64): a0's 32 channels a1 lacks are rotated and
    16 of them kept. The moment is computed once and kept beside the chain; ``carry: none`` maps a0
    as before (its reader is the stored anchor's)."""
    root = cbd_home / "chains"
    monkeypatch.setattr(calibration, "_MOMENTS", {})  # nothing from an earlier test in this process
    for f in (root / ".anchor-outputs").glob("*.moment.safetensors"):
        f.unlink()
    plan = make_plan(InitRequest(chain="test", architecture=ARCH, calibrate=False, card=False), random_chain)
    assert plan.trans.carry == "pca"
    li, _, calib = prepare(plan, random_chain, progress=lambda _: None, chains_root=root)
    assert calib["carry"] == {"big": {"anchor": plan.big, "method": "pca", "fixed": 64, "rotated": 32, "kept": 16,
                                      "energy_kept": calib["carry"]["big"]["energy_kept"]}}
    assert 0.5 - 1e-6 <= calib["carry"]["big"]["energy_kept"] <= 1.0  # the top half of the directions
    assert li.big.tag.startswith("carry-")
    card = prepare(plan, random_chain, progress=lambda _: None, chains_root=root, card=True)[2]["card"]
    assert card["carry"] == calib["carry"]  # the init card says it too
    assert list((root / ".anchor-outputs").glob(f"test.{plan.big}.*.moment.safetensors"))
    big = li.big  # the moment cached: a second LInit rotates the same way
    assert torch.equal(linit_for(plan, random_chain, root).big.read("model.embed_tokens.weight"),
                       big.read("model.embed_tokens.weight"))
    moment = anchor_moment(random_chain, plan.big, linit_for(plan, random_chain, root).big, root)
    assert moment.shape == (96, 96) and moment.dtype == torch.float64

    none = make_plan(InitRequest(chain="test", architecture=ARCH, calibrate=False, card=False, carry="none"),
                     random_chain)
    assert none.id != plan.id
    li_none, _, calib_none = prepare(none, random_chain, progress=lambda _: None, chains_root=root)
    assert "carry" not in calib_none and li_none.big.tag == ""
    assert not torch.equal(li.state(0.0)["model.embed_tokens.weight"], li_none.state(0.0)["model.embed_tokens.weight"])


def test_the_reader_rotates_a_tensor_read_in_blocks_once_and_says_which_tensors_are_its_own():
    """A streamed write reads the embedding block by block: the rotated tensor is kept for the
    next read of the same name, and LInit is told (``is_view``) that it and its slices must be
    copied before anything writes over them."""
    spec = _llama_spec(tie_word_embeddings=False)
    state = _perturbed(spec, 0)
    carry = carry_rotation(resid_moment(spec, state, [_batch(spec, 1)]), list(range(0, spec.hidden_size, 2)))
    reads = []
    r = rotated_reader(spec, lambda n: reads.append(n) or state[n], carry)
    e = r("model.embed_tokens.weight")
    assert r("model.embed_tokens.weight") is e and reads == ["model.embed_tokens.weight"]
    assert r.is_view(e) and r.is_view(e[3:9]) and not r.is_view(e.clone())
    r("lm_head.weight")  # another tensor: the embedding is no longer kept
    assert not r.is_view(e)
