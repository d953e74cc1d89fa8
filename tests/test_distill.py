"""The distillation engine on tiny real Llama models (hidden 32/64, 2 layers, vocab 99)."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file

from cbd.errors import AssetUnavailableError, IntegrityError, ShapeError
from cbd.train.checkpoints import optimizer_from_flat, optimizer_to_flat
from cbd.train.config import DistillConfig, lr_at
from cbd.train.loop import _make_optimizer, distill, evaluate

_spec = importlib.util.spec_from_file_location("_ddp_script", Path(__file__).with_name("_ddp_script.py"))
ddp_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ddp_script)
tiny_llama, VOCAB, SEQ, BATCH = ddp_script.tiny_llama, ddp_script.VOCAB, ddp_script.SEQ, ddp_script.BATCH


def counting_batch(step: int) -> torch.Tensor:
    """Learnable data: each row counts up by a row-specific stride, mod the vocabulary."""
    g = torch.Generator().manual_seed(step)
    start, stride = (
        torch.randint(0, VOCAB, (BATCH, 1), generator=g),
        torch.randint(1, 4, (BATCH, 1), generator=g),
    )
    return (start + stride * torch.arange(SEQ + 1)) % VOCAB


EVAL = [counting_batch(10_000 + i) for i in range(2)]


def cfg_for(**kw) -> DistillConfig:
    base = dict(
        total_steps=10,
        batch_size=BATCH,
        seq_len=SEQ,
        lr=3e-3,
        warmup_steps=2,
        eval_every=5,
        ckpt_every=5,
        log_every=5,
        device="cpu",
    )
    return DistillConfig(**(base | kw))


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(2, 64, seed=0)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max abs weight difference {worst}"


# ---- config and schedule ------------------------------------------------------------------------
def test_config_derives_steps_from_tokens_in_one_place():
    cfg = DistillConfig(total_tokens=1000, batch_size=4, seq_len=16)
    assert (cfg.tokens_per_step, cfg.steps) == (64, 16)  # ceil(1000 / 64)
    assert DistillConfig(total_steps=7).steps == 7


@pytest.mark.parametrize(
    "kw, match",
    [
        ({}, "exactly one of total_steps"),
        ({"total_steps": 5, "total_tokens": 64}, "exactly one of total_steps"),
        ({"total_steps": 5, "warmup_steps": 6}, "warmup_steps 6 exceeds the run's 5 steps"),
        ({"total_steps": 5, "kl_weight": 0, "ce_weight": 0}, "nothing to train on"),
        ({"total_steps": 5, "lerning_rate": 1.0}, "Extra inputs are not permitted"),
        ({"total_steps": 5, "temperature": 0}, "greater than 0"),
    ],
)
def test_config_rejects_bad_input(kw, match):
    with pytest.raises(ValidationError, match=match):
        DistillConfig(**kw)


def test_config_is_frozen():
    with pytest.raises(ValidationError):
        DistillConfig(total_steps=5).lr = 1.0


def test_lr_warms_up_linearly_then_decays_to_the_floor():
    cfg = DistillConfig(total_steps=20, warmup_steps=4, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


# ---- evaluation and training --------------------------------------------------------------------
def test_evaluate_is_mean_next_token_cross_entropy(teacher):
    batches = [counting_batch(0), counting_batch(1)[:3]]
    with torch.no_grad():
        nll = [
            F.cross_entropy(teacher(b[:, :-1]).logits.flatten(0, 1), b[:, 1:].flatten(), reduction="sum")
            for b in batches
        ]
    want = sum(n.item() for n in nll) / sum(b[:, 1:].numel() for b in batches)
    assert evaluate(teacher, batches) == pytest.approx(want, rel=1e-6)


def test_distill_lowers_eval_loss_and_reports_consistently(teacher):
    student = tiny_llama(2, 32, seed=1)
    cfg = cfg_for(total_steps=30, eval_every=10, kl_weight=0.2, ce_weight=0.8)
    result = distill(student, teacher, counting_batch, EVAL, cfg, progress=False)
    assert result.steps == 30 and result.tokens == 30 * BATCH * SEQ == result.teacher_tokens
    assert len(result.train_loss) == 30
    assert [t for t, _ in result.eval_loss] == [0, 640, 1280, 1920]
    assert result.final_eval_loss == result.eval_loss[-1][1] == pytest.approx(evaluate(student, EVAL))
    assert result.final_eval_loss < result.eval_loss[0][1] - 0.5
    assert not teacher.training and student.training


def test_kl_weight_zero_trains_without_a_teacher():
    student = tiny_llama(2, 32, seed=1)
    result = distill(student, None, counting_batch, EVAL, cfg_for(kl_weight=0, ce_weight=1), progress=False)
    assert result.teacher_tokens == 0 and result.final_eval_loss < result.eval_loss[0][1]


def test_bad_batch_shape_is_a_shape_error(teacher):
    with pytest.raises(ShapeError, match=r"expected torch.int64 \(4, 17\)"):
        distill(
            tiny_llama(2, 32, 1), teacher, lambda s: counting_batch(s)[:, :-2], [], cfg_for(), progress=False
        )


def test_callers_rng_is_left_untouched(teacher):
    student = tiny_llama(2, 32, 1)
    before = torch.get_rng_state()
    distill(student, teacher, counting_batch, [], cfg_for(total_steps=2), progress=False)
    assert torch.equal(torch.get_rng_state(), before)


# ---- checkpoints and resume ---------------------------------------------------------------------
class Crash(Exception):
    pass


def crash_at(step):
    def callback(info):
        if info["step"] == step:
            raise Crash

    return callback


def test_resume_after_a_crash_is_bitwise_identical(teacher, tmp_path):
    # dropout on, so the per-step reseeding is part of what must replay; tied head and embedding
    make = lambda seed: tiny_llama(2, 32, seed, attention_dropout=0.2, tie_word_embeddings=True)  # noqa: E731
    cfg = cfg_for(log_every=1)
    straight = make(1)
    want = distill(straight, teacher, counting_batch, EVAL, cfg, progress=False)

    with pytest.raises(Crash):  # checkpoint at step 5, crash at step 7
        distill(make(1), teacher, counting_batch, EVAL, cfg, work_dir=tmp_path, progress=crash_at(7))
    restarted = make(99)  # a new process: other initial weights, all overwritten by the checkpoint
    got = distill(restarted, teacher, counting_batch, EVAL, cfg, work_dir=tmp_path, progress=False)

    assert got.resumed_from_step == 5 and got.steps == 10
    assert restarted.lm_head.weight is restarted.model.embed_tokens.weight  # still tied
    assert_same_weights(weights(restarted), weights(straight))
    assert got.train_loss == want.train_loss and got.eval_loss == want.eval_loss


def test_checkpoint_is_safetensors_and_json_only(teacher, tmp_path):
    distill(tiny_llama(2, 32, 1), teacher, counting_batch, [], cfg_for(), work_dir=tmp_path, progress=False)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        "checkpoints/latest.json",
        "checkpoints/step_00000010/model.safetensors",
        "checkpoints/step_00000010/optimizer.safetensors",
        "checkpoints/step_00000010/state.json",
        "distill_config.json",
    ]
    state = json.loads((tmp_path / "checkpoints/step_00000010/state.json").read_text())
    assert state["step"] == 10 and state["config"]["total_steps"] == 10
    assert any(
        k.endswith(".exp_avg_sq")
        for k in load_file(tmp_path / "checkpoints/step_00000010/optimizer.safetensors")
    )


def test_finished_run_resumes_to_a_no_op(teacher, tmp_path):
    first = distill(
        tiny_llama(2, 32, 1), teacher, counting_batch, EVAL, cfg_for(), work_dir=tmp_path, progress=False
    )
    again = distill(
        tiny_llama(2, 32, 5), None, counting_batch, EVAL, cfg_for(), work_dir=tmp_path, progress=False
    )
    assert again.resumed_from_step == 10 and again.teacher_tokens == 0
    assert again.final_eval_loss == first.final_eval_loss


def test_resume_with_another_recipe_is_refused(teacher, tmp_path):
    distill(
        tiny_llama(2, 32, 1),
        teacher,
        counting_batch,
        [],
        cfg_for(total_steps=5),
        work_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(IntegrityError, match="lr"):
        distill(
            tiny_llama(2, 32, 1),
            teacher,
            counting_batch,
            [],
            cfg_for(total_steps=5, lr=1e-3),
            work_dir=tmp_path,
            progress=False,
        )


def test_optimizer_state_round_trips_through_flat_tensors(teacher):
    student = tiny_llama(2, 32, 1)
    opt = _make_optimizer(student, cfg_for(weight_decay=0.1), torch.device("cpu"))
    student(counting_batch(0)).logits.sum().backward()
    opt.step()
    tensors, meta = optimizer_to_flat(opt)
    json.dumps(meta)  # must be plain JSON
    restored = _make_optimizer(student, cfg_for(weight_decay=0.1), torch.device("cpu"))
    restored.load_state_dict(optimizer_from_flat(tensors, json.loads(json.dumps(meta))))
    a, b = opt.state_dict(), restored.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, state in a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["state"][i][name]), (i, name)


# ---- teacher top-k cache ------------------------------------------------------------------------
def test_topk_cache_replays_a_step_without_the_teacher(teacher, tmp_path):
    cfg = cfg_for(topk_cache=8, temperature=2.0)
    first = tiny_llama(2, 32, 1)
    a = distill(first, teacher, counting_batch, [], cfg, cache_dir=tmp_path / "cache", progress=False)
    replay = tiny_llama(2, 32, 1)
    b = distill(replay, None, counting_batch, [], cfg, cache_dir=tmp_path / "cache", progress=False)
    assert a.teacher_tokens == 10 * BATCH * SEQ and b.teacher_tokens == 0
    assert_same_weights(weights(first), weights(replay))
    with pytest.raises(AssetUnavailableError, match="step 0 is not in the top-k cache"):
        distill(
            tiny_llama(2, 32, 1),
            None,
            counting_batch,
            [],
            cfg_for(topk_cache=4),  # other k
            cache_dir=tmp_path / "cache",
            progress=False,
        )


# ---- progress -----------------------------------------------------------------------------------
def test_progress_callback_and_structured_log_lines(teacher, caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="cbd.distill"):
        distill(tiny_llama(2, 32, 1), teacher, counting_batch, EVAL, cfg_for(), progress=seen.append)
    assert [d["step"] for d in seen] == [5, 10]
    assert {"step", "total", "tokens", "loss", "eta_s", "tok_s"} <= seen[0].keys()
    assert seen[-1]["total"] == 10 and seen[-1]["eta_s"] == 0 and seen[-1]["eval_loss"] is not None
    lines = [r.getMessage() for r in caplog.records if r.name == "cbd.distill"]
    assert lines[0].startswith("step=5/10 tokens=320 loss=") and "tok_s=" in lines[0]


def test_terminal_gets_a_progress_bar(teacher, monkeypatch, caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with caplog.at_level(logging.INFO, logger="cbd.distill"):
        distill(tiny_llama(2, 32, 1), teacher, counting_batch, [], cfg_for(total_steps=2, log_every=1))
    assert "tok/s" in term.getvalue() and "loss=" in term.getvalue()
    assert not [r for r in caplog.records if r.getMessage().startswith("step=")]  # the bar replaces log lines


# ---- data parallel ------------------------------------------------------------------------------
def test_torchrun_two_ranks_match_one_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), multi.mkdir()
    ddp_script.run(single)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(Path(__file__).with_name("_ddp_script.py")),
        str(multi),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(
        load_file(single / "student.safetensors"), load_file(multi / "student.safetensors"), atol=1e-4
    )
    one, two = (json.loads((d / "result.json").read_text()) for d in (single, multi))
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
    assert two["final_eval_loss"] == pytest.approx(one["final_eval_loss"], abs=1e-5)
    assert (multi / "run/checkpoints/latest.json").exists()
