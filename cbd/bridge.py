"""Bridge distillation: a checkpoint of the chain's family in *another* tokenizer (METHOD.md 1.4-1.5).

Interpolation is defined within one vocabulary, so a target tokenizer other than the chain's is
made in three steps:

1. **body**: every non-vocabulary tensor is LInit's, exactly as ``cbd.execute.run_plan`` makes it;
2. **vocabulary transfer (FVT)**: each target token's raw bytes are tokenised by the chain's
   tokenizer and its embedding row is the mean of those pieces' rows of the chain-vocabulary
   LInit embedding (Gee et al. 2022, "Fast Vocabulary Transfer"). bos/eos/pad/unk copy the
   chain's rows of the same role; other special tokens and the padding rows (the vocabulary
   is rounded up to a multiple of 64) get the mean chain row;
3. **bridge run**: a short distillation in the target tokenizer from a chain-vocabulary model
   (the source a0 by default, or the bigger adjacent anchor, or the LInit of the same target)
   on positions where both tokenizations of the same text end at the same character: KL on the
   tokens both vocabularies spell the same (default) or ULD, the L1 distance between sorted
   probability vectors (Boizard et al. 2024), plus cross-entropy on the target tokens.

Also here: ``foreign_anchor_zero``, a source of another family (Gemma-3-270M) taught to a model
of the chain's family by sequence-level KD. Measured costs and gains: docs/bridge.md.

>>> sorted_l1 = uld_loss(torch.tensor([[0.7, 0.3]]), torch.tensor([[0.2, 0.1, 0.7]]), k=8)
>>> round(float(sorted_l1), 3)   # |0.7-0.7| + |0.3-0.2| + |0-0.1|
0.2
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from cbd import arch
from cbd.artifacts import ArtifactInfo, load_artifact, publish, staging_dir
from cbd.chainstore import load_anchor, tokenizer_dir
from cbd.checkpoint import model_card, write_config_files, write_weights
from cbd.distill import DistillConfig, lr_at
from cbd.errors import AssetUnavailableError
from cbd.manifest import ChainManifest
from cbd.model import build_model, eval_loss, state_of
from cbd.plan import BridgeOptions, Plan
from cbd.spec import ModelSpec, make_spec

SPECIAL_ROLES = ("eos", "bos", "pad", "unk")  # precedence when one id has several roles
BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
WORD_START = re.compile(r"\s\S")


# ---- vocabulary transfer (pure) -------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable stand-in of each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_json(tok) -> dict:
    dec = tok.backend_tokenizer.decoder
    return json.loads(dec.__getstate__()) if dec is not None else {}


def is_byte_level(tok) -> bool:
    """True when the tokenizer's pieces are GPT-2 byte-level strings (GPT-2, SmolLM2, Llama 3)."""
    d = _decoder_json(tok)
    return d.get("type") == "ByteLevel" or any(x.get("type") == "ByteLevel" for x in d.get("decoders", []))


def token_bytes(tok) -> list[bytes | None]:
    """The raw bytes each id stands for; None for special tokens (they have no text).

    Byte-level pieces are mapped back through GPT-2's byte alphabet (``"Ġthe"`` -> ``b" the"``,
    half a UTF-8 character stays half); SentencePiece pieces go through the tokenizer's own
    decoder (``"▁the"`` -> ``" the"``) and ``<0xHH>`` byte-fallback pieces become that byte.
    """
    added = {i: a for i, a in tok.added_tokens_decoder.items()}
    bd = _byte_decoder() if is_byte_level(tok) else None
    dec = tok.backend_tokenizer.decoder
    out: list[bytes | None] = []
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if i in added:  # added tokens hold their literal text, not byte-level pieces
            out.append(None if added[i].special else added[i].content.encode())
        elif piece is None:
            out.append(None)
        elif bd is not None and all(c in bd for c in piece):
            out.append(bytes(bd[c] for c in piece))
        elif m := BYTE_FALLBACK.match(piece):
            out.append(bytes([int(m.group(1), 16)]))
        else:
            out.append((dec.decode([piece]) if dec is not None else piece).encode())
    return out


def _special_ids(tok, ids: dict[str, int | None] | None = None) -> dict[str, int]:
    ids = ids if ids is not None else {r: getattr(tok, f"{r}_token_id", None) for r in SPECIAL_ROLES}
    return {r: i for r, i in ids.items() if i is not None}


@dataclass
class VocabMap:
    """Where each target row comes from: FVT pieces, a chain special row, or the mean row."""

    vocab_size: int  # padded
    pieces: list[list[int]]  # per tokenizer id: chain ids (empty: mean row)
    special: dict[int, int]  # target id -> chain id (same role)
    stats: dict[str, int] = field(default_factory=dict)


def vocab_map(target_tok, chain_tok, *, vocab_size: int, chain_special: dict[str, int] | None = None) -> VocabMap:
    """FVT pieces of every target token under the chain tokenizer (the transfer's only text step)."""
    raw = token_bytes(target_tok)
    chain_bl = is_byte_level(chain_tok)
    texts = {i: b.decode() for i, b in enumerate(raw) if b is not None and _utf8(b)}
    pieces: list[list[int]] = [[] for _ in raw]
    if texts:
        enc = chain_tok(list(texts.values()), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for i, ids in zip(texts, enc, strict=True):
            pieces[i] = list(ids)
    enc_bytes = {v: k for k, v in _byte_decoder().items()}
    partial = 0
    for i, b in enumerate(raw):
        if b is None or i in texts:
            continue
        partial += 1  # half a character: byte-level pieces when the chain has them
        if chain_bl:
            pieces[i] = [t.id for t in chain_tok.backend_tokenizer.model.tokenize("".join(enc_bytes[x] for x in b))]
        else:
            pieces[i] = chain_tok(b.decode(errors="replace"), add_special_tokens=False)["input_ids"]
    cs = _special_ids(chain_tok, chain_special)
    special: dict[int, int] = {}
    for role, tid in _special_ids(target_tok).items():
        if role in cs:
            special.setdefault(tid, cs[role])
    stats = {"tokenizer_size": len(raw), "vocab_size": vocab_size, "padding_rows": vocab_size - len(raw),
             "fvt": sum(1 for i, p in enumerate(pieces) if p and i not in special),
             "partial_characters": partial, "special_mapped": len(special),
             "mean_row": sum(1 for i, p in enumerate(pieces) if not p and i not in special),
             "single_piece": sum(1 for i, p in enumerate(pieces) if len(p) == 1 and i not in special)}
    return VocabMap(vocab_size, pieces, special, stats)


def _utf8(b: bytes) -> bool:
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def fvt(chain_rows: Tensor, vmap: VocabMap) -> Tensor:
    """``(V_target, d)`` rows: mean of the chain rows of each token's pieces (FVT).

    Tokens without pieces, unmapped special tokens and the padding rows get the mean chain row
    (a new token then starts as likely as an average one, not as a random direction).
    """
    mean = chain_rows.mean(0)
    out = mean.expand(vmap.vocab_size, -1).clone()
    have = [i for i, p in enumerate(vmap.pieces) if p]
    if have:
        flat = torch.tensor([c for i in have for c in vmap.pieces[i]], dtype=torch.long)
        offsets = torch.tensor(np.cumsum([0] + [len(vmap.pieces[i]) for i in have[:-1]]), dtype=torch.long)
        out[have] = F.embedding_bag(flat, chain_rows, offsets, mode="mean")
    for tid, cid in vmap.special.items():
        out[tid] = chain_rows[cid]
    return out


TRANSFERS = {"fvt": fvt}  # BridgeOptions.transfer -> (chain rows, VocabMap) -> target rows


def bridge_spec(target: ModelSpec, tok, multiple: int) -> ModelSpec:
    """The plan's target in the target tokenizer: padded vocabulary, its bos/eos/pad ids."""
    v = math.ceil(len(tok) / multiple) * multiple
    return make_spec(target.model_dump() | {"vocab_size": v, "bos_token_id": tok.bos_token_id,
                                            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})


def vocab_tensors(spec: ModelSpec) -> list[str]:
    """Names of the tensors with a vocabulary axis (the embedding and an untied head)."""
    return [n for n, roles in arch.global_table(spec).items() if any(a == "vocab" for a, _ in roles)]


# ---- aligned text: the same characters tokenised both ways -----------------------------------
@dataclass
class AlignedBatch:
    student: Tensor  # (B, T+1) target-tokenizer ids
    teacher: Tensor  # (B, U) chain-tokenizer ids, right-padded
    pairs: Tensor  # (N, 3): (row, student position, teacher position) that end at the same character


def _clean_ends(offsets: list[tuple[int, int]], n: int) -> dict[int, int]:
    """{end character: position} of the first ``n`` tokens that end at a character boundary.

    A character split over several byte tokens ends them all at the same offset; only the
    last of them has seen the whole character, so a token is kept only when the next one ends
    later.
    """
    ends: dict[int, int] = {}
    for pos in range(min(n, len(offsets))):
        end = offsets[pos][1]
        if pos + 1 == len(offsets) or offsets[pos + 1][1] != end:
            ends[end] = pos
    return ends


class BridgeData:
    """Random text windows, tokenised by both tokenizers; window k depends only on (seed, k)."""

    def __init__(self, text: str, student_tok, teacher_tok, *, batch_size: int, seq_len: int, seed: int) -> None:
        self.text, self.s_tok, self.t_tok = text, student_tok, teacher_tok
        self.bs, self.T, self.seed = batch_size, seq_len, seed
        self.pad = teacher_tok.pad_token_id or teacher_tok.eos_token_id or 0

    def window(self, rng: np.random.Generator) -> tuple[list[int], list[int], list[tuple[int, int]]]:
        span = 8 * (self.T + 1)
        while True:
            start = int(rng.integers(0, max(1, len(self.text) - span)))
            m = WORD_START.search(self.text, start)  # begin at a word: " word"
            chunk = self.text[m.start() if m else start:][:span]
            s = self.s_tok(chunk, add_special_tokens=False, return_offsets_mapping=True)
            if len(s["input_ids"]) > self.T + 1 or span >= len(self.text):  # token T not cut by the span
                break
            span *= 2
        s_ids, s_off = s["input_ids"][: self.T + 1], s["offset_mapping"][: self.T + 1]
        limit = s_off[self.T - 1][1]  # the text the student's last input position has seen
        t = self.t_tok(chunk, add_special_tokens=False, return_offsets_mapping=True)
        n_t = max(1, sum(1 for _, end in t["offset_mapping"] if end <= limit))
        s_ends = _clean_ends(s_off, self.T)
        t_ends = _clean_ends(t["offset_mapping"], n_t)
        pairs = [(s_ends[e], t_ends[e]) for e in sorted(s_ends.keys() & t_ends.keys())]
        return s_ids, t["input_ids"][:n_t], pairs

    def batch(self, step: int) -> AlignedBatch:
        rng = np.random.default_rng([self.seed, step])
        rows = [self.window(rng) for _ in range(self.bs)]
        if any(len(s) < self.T + 1 for s, _, _ in rows):
            raise AssetUnavailableError(f"the bridge corpus is too short for windows of {self.T + 1} tokens")
        U = max(len(t) for _, t, _ in rows)
        teacher = torch.full((self.bs, U), self.pad, dtype=torch.long)
        for b, (_, t, _) in enumerate(rows):
            teacher[b, : len(t)] = torch.tensor(t, dtype=torch.long)
        pairs = torch.tensor([(b, i, j) for b, (_, _, p) in enumerate(rows) for i, j in p], dtype=torch.long)
        return AlignedBatch(torch.tensor([s for s, _, _ in rows], dtype=torch.long), teacher, pairs.view(-1, 3))


# ---- losses (pure) ----------------------------------------------------------------------------
def uld_loss(p_student: Tensor, p_teacher: Tensor, *, k: int) -> Tensor:
    """Universal Logit Distillation: L1 between the sorted probability vectors, mean over rows.

    ``p_student`` ``(N, V_s)`` and ``p_teacher`` ``(N, V_t)`` are probabilities at aligned
    positions; vocabularies differ, so only the *shape* of the distributions is compared, the
    shorter vector padded with zeros (Boizard et al. 2024). The k largest of each are compared
    exactly and the rest as one tail mass: equal to ULD when k >= both vocabularies, a lower
    bound otherwise (the tail's probabilities are tiny; a full sort of 50k per token is not).
    """
    k_s, k_t = min(k, p_student.shape[-1]), min(k, p_teacher.shape[-1])
    top_s, top_t = p_student.topk(k_s, dim=-1).values, p_teacher.topk(k_t, dim=-1).values
    width = max(k_s, k_t)
    top_s, top_t = F.pad(top_s, (0, width - k_s)), F.pad(top_t, (0, width - k_t))
    tail = ((1 - top_s.sum(-1)) - (1 - top_t.sum(-1))).abs()
    return ((top_s - top_t).abs().sum(-1) + tail).mean()


def matched_kl(student: Tensor, teacher: Tensor, shared: tuple[Tensor, Tensor]) -> Tensor:
    """KL(p_t || q_s) on the tokens both vocabularies spell the same, each renormalised there.

    ``student`` ``(N, V_s)`` and ``teacher`` ``(N, V_t)`` are logits or log-probabilities (the
    renormalisation makes them equivalent); ``shared`` = (student ids, teacher ids) of identical
    strings (e.g. 37k of GPT-2's 50k tokens are single SmolLM2 tokens). Unlike ULD it says
    *which* token the teacher expects, so the student learns the teacher's predictions.
    """
    lq = F.log_softmax(student[:, shared[0]].float(), dim=-1)
    lp = F.log_softmax(teacher[:, shared[1]].float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def bridge_loss(student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None, pairs: Tensor,
                opts: BridgeOptions, shared: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict[str, float]]:
    """``ce_weight * CE(target tokens) + logit_weight * logit loss(aligned positions)``; (loss, parts)."""
    log_p = F.log_softmax(student_logits.float(), dim=-1)  # (B, T, V_s)
    ce = -log_p.gather(-1, targets[..., None]).mean()
    kd = log_p.new_zeros(())
    if opts.logit_weight and len(pairs):
        lq = log_p[pairs[:, 0], pairs[:, 1]]  # (N, V_s)
        t = teacher_logits[pairs[:, 0], pairs[:, 2]]  # (N, V_t)
        if opts.logit_loss == "matched-kl":
            kd = matched_kl(lq, t, shared)
        else:
            kd = uld_loss(lq.exp(), F.softmax(t.float(), dim=-1), k=opts.uld_topk)
    loss = opts.ce_weight * ce + opts.logit_weight * kd
    return loss, {"loss": float(loss.detach()), "ce": float(ce.detach()), opts.logit_loss: float(kd.detach())}


def shared_tokens(vmap: VocabMap) -> tuple[Tensor, Tensor]:
    """(target ids, chain ids) of tokens that are one chain token with the same bytes."""
    pairs = [(i, p[0]) for i, p in enumerate(vmap.pieces) if len(p) == 1 and i not in vmap.special]
    t = torch.tensor(pairs, dtype=torch.long).view(-1, 2)
    return t[:, 0], t[:, 1]


# ---- the bridge run ----------------------------------------------------------------------------
def trainable(student, train: str) -> list:
    """The parameters a bridge trains: all, or (``embeddings``) only those indexed by the
    vocabulary (llama's ``embed_tokens``/``lm_head``, GPT-2's ``wte``/``lm_head``); the rest frozen."""
    if train == "embeddings":
        for name, p in student.named_parameters():
            p.requires_grad_(name in arch.VOCAB_PARAMS)
    return [p for p in student.parameters() if p.requires_grad]


def bridge_train(student, teacher, data: BridgeData, opts: BridgeOptions, *, shared=None, report=None) -> dict:
    """Train ``student`` in place; returns the step losses and the teacher's token count."""
    params = trainable(student, opts.train)
    opt = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = DistillConfig(lr=opts.lr, min_lr_ratio=opts.min_lr_ratio, warmup_steps=min(opts.warmup_steps, opts.steps),
                             total_steps=opts.steps)  # the chain's warmup + cosine schedule
    student.train()
    if teacher is not None:
        teacher.eval()
    history, teacher_tokens = [], 0
    for step in range(opts.steps):
        b = data.batch(step)
        t_logits = None
        if teacher is not None:  # None: cross-entropy only (logit_weight 0)
            with torch.no_grad():
                t_logits = teacher(input_ids=b.teacher, use_cache=False).logits  # (B, U, V_t)
            teacher_tokens += b.teacher.numel()
        s_logits = student(input_ids=b.student[:, :-1], use_cache=False).logits  # (B, T, V_s)
        loss, parts = bridge_loss(s_logits, b.student[:, 1:], t_logits, b.pairs, opts, shared)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append(parts | {"aligned": len(b.pairs) / b.student[:, 1:].numel()})
        if report is not None:  # the bridge is the 10%..90% stretch of a bridge job
            report({"stage": "bridge distillation", "fraction": 0.1 + 0.8 * (step + 1) / opts.steps,
                    "step": step + 1, "total": opts.steps, **parts})
    for p in student.parameters():
        p.requires_grad_(True)
    student.eval()
    return {"history": history, "teacher_tokens": teacher_tokens}


def corpus_text(name: str) -> str:
    from cbd.assets import corpus

    return "\n\n".join(corpus(name).train)


def heldout_batches(corpus_name: str, tokenizer: str, opts: BridgeOptions) -> list[Tensor]:
    """Held-out windows in the *target* tokenizer (the recipe corpus' held-out work)."""
    from cbd import data

    tokens = data.token_file(corpus_name, tokenizer, "heldout")
    return data.eval_batches(tokens, batch_size=opts.eval_batch_size, seq_len=opts.eval_seq_len,
                             num_batches=opts.eval_batches, seed=opts.seed)


@dataclass
class Bridged:
    """What ``make_bridged`` returns: the target spec, its state and what the bridge measured."""

    spec: ModelSpec
    state: dict[str, Tensor]
    summary: dict
    wall_s: dict[str, float]


def make_bridged(plan: Plan, manifest: ChainManifest, li, alpha: float, *, opts: BridgeOptions, chains_root=None,
                 report=None, transfer=None) -> Bridged:
    """Body by LInit, vocabulary by FVT, then the bridge run (the work of ``run_bridge``).

    ``transfer`` replaces ``TRANSFERS[opts.transfer]`` (benchmarks: random rows).
    """
    from transformers import AutoTokenizer

    from cbd.assets import load_tokenizer

    report = report or (lambda _: None)
    t0 = time.perf_counter()
    tok = load_tokenizer(plan.tokenizer)
    chain_tok = AutoTokenizer.from_pretrained(tokenizer_dir(manifest, chains_root))
    spec = bridge_spec(plan.target, tok, opts.pad_vocab_multiple)
    base = manifest.base
    vmap = vocab_map(tok, chain_tok, vocab_size=spec.vocab_size, chain_special={
        "bos": base.bos_token_id, "eos": base.eos_token_id, "pad": base.pad_token_id,
        "unk": chain_tok.unk_token_id})
    teacher_state = li.state(alpha)  # the chain-vocabulary LInit of the same target
    transfer = transfer or TRANSFERS[opts.transfer]
    state = {n: transfer(teacher_state[n], vmap) if n in vocab_tensors(spec) else teacher_state[n]
             for n in arch.param_names(spec)}
    wall = {"transfer": time.perf_counter() - t0}
    report({"stage": "vocabulary transfer", "fraction": 0.1})
    corpus_name = opts.corpus or manifest.recipe.get("data", {}).get("corpus", "austen")
    heldout = heldout_batches(corpus_name, plan.tokenizer, opts)
    student = build_model(spec, state)
    loss_fvt = eval_loss(student, heldout)
    summary = {"method": method_name(opts), "corpus": corpus_name, "vocab": vmap.stats,
               "heldout_loss_fvt": round(loss_fvt, 4), "steps": opts.steps, "tokens": 0, "teacher_tokens": 0}
    if opts.steps:
        t1 = time.perf_counter()
        teacher = _teacher(plan, manifest, teacher_state, opts, chains_root) if opts.logit_weight else None
        data = BridgeData(corpus_text(corpus_name), tok, chain_tok, batch_size=opts.batch_size,
                          seq_len=opts.seq_len, seed=opts.seed)
        run = bridge_train(student, teacher, data, opts, shared=shared_tokens(vmap), report=report)
        del teacher
        h = run["history"]
        summary |= {"tokens": opts.steps * opts.batch_size * opts.seq_len, "teacher_tokens": run["teacher_tokens"],
                    "heldout_loss": round(eval_loss(student, heldout), 4),
                    "train_loss_first": {k: round(v, 4) for k, v in h[0].items()},
                    "train_loss_last": {k: round(v, 4) for k, v in h[-1].items()},
                    "aligned_fraction": round(float(np.mean([x["aligned"] for x in h])), 4)}
        wall["train"] = time.perf_counter() - t1
    else:
        summary["heldout_loss"] = summary["heldout_loss_fvt"]
    return Bridged(spec, state_of(student, spec), summary, wall)


def method_name(opts: BridgeOptions) -> str:
    """``fvt``, ``fvt+ce`` or ``fvt+<logit loss>+ce``."""
    if not opts.steps:
        return opts.transfer
    kd = f"+{opts.logit_loss}" if opts.logit_weight else ""
    return f"{opts.transfer}{kd}+ce" if opts.ce_weight else f"{opts.transfer}{kd}"


def _teacher(plan: Plan, manifest: ChainManifest, linit_state: dict[str, Tensor], opts: BridgeOptions, chains_root):
    """The chain-vocabulary model the bridge distils from."""
    name = {"big": plan.big, "source": manifest.anchors[0].name}.get(opts.teacher)
    if name is not None:
        a = load_anchor(manifest, name, chains_root)
        return build_model(a.spec, {n: a.read(n) for n in arch.param_names(a.spec)})
    return build_model(plan.target, linit_state)


def run_bridge(plan: Plan, manifest: ChainManifest, *, progress, chains_root: Path | None = None,
               artifacts_root: Path | None = None) -> ArtifactInfo:
    """Execute a bridge plan into a published checkpoint folder (idempotent, atomic)."""
    from cbd.assets import tokenizer_dir as target_tokenizer_dir
    from cbd.execute import calibrate, linit_for, recipe_of, validation_batches

    existing = load_artifact(plan.id, artifacts_root)
    if existing is not None:
        return existing
    progress = progress or (lambda _: None)
    opts = plan.bridge_options or BridgeOptions()
    progress({"stage": "loading anchors", "fraction": 0.0})
    li = linit_for(plan, manifest, chains_root)
    alpha, calib = plan.alpha, {}
    if plan.calibrate:
        progress({"stage": "calibrating alpha", "fraction": 0.02})
        alpha, calib = calibrate(li, validation_batches(manifest, chains_root))
    with torch.random.fork_rng():
        torch.manual_seed(opts.seed)
        out = make_bridged(plan, manifest, li, alpha, opts=opts, chains_root=chains_root, report=progress)
    recipe = recipe_of(plan, manifest, alpha, calib) | {
        "target": out.spec.model_dump(mode="json") | {"num_key_value_heads": out.spec.kv_heads},
        "num_params": out.spec.num_params(), "bridge": {**opts.model_dump(mode="json"), **out.summary}}
    progress({"stage": "writing", "fraction": 0.92})
    tmp = staging_dir(plan.id, artifacts_root)
    try:
        write_weights(tmp, out.spec, ((n, out.state[n]) for n in arch.param_names(out.spec)),
                      dtype=plan.dtype, recipe=recipe)
        card = model_card(repo_name=f"cbd-{plan.id[:12]}", recipe=recipe, base_model=manifest.source)
        write_config_files(tmp, out.spec, dtype=plan.dtype, recipe=recipe,
                           tokenizer_src=target_tokenizer_dir(plan.tokenizer), card=card + bridge_card(recipe))
        _ensure_fast_tokenizer(tmp, plan.tokenizer)
        metrics = calib | {"bridge": out.summary | {"wall_s": {k: round(v, 1) for k, v in out.wall_s.items()}}}
        info = publish(tmp, plan.id, {"alpha": alpha, "anchors": recipe["anchors"], "warnings": plan.warnings,
                                      "plan": plan.model_dump(mode="json"), "metrics": metrics}, artifacts_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress({"stage": "done", "fraction": 1.0})
    return info


def _ensure_fast_tokenizer(folder: Path, name: str) -> None:
    """Registered tokenizers may lack a config or name another class: save as PreTrainedTokenizerFast."""
    from cbd.assets import FAST_TOKENIZER_CLASS, load_tokenizer, save_fast_tokenizer

    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file() or json.loads(cfg.read_text()).get("tokenizer_class") != FAST_TOKENIZER_CLASS:
        save_fast_tokenizer(load_tokenizer(name), folder)


def bridge_card(recipe: dict) -> str:
    """The model card's bridge section: what was transferred, trained and measured."""
    b, v = recipe["bridge"], recipe["bridge"]["vocab"]
    teacher = {"big": "bigger adjacent anchor", "source": "source (a0)"}.get(b["teacher"], "LInit model")
    kd = {"uld": "ULD (sorted-probability L1)", "matched-kl": "KL on the shared tokens"}[b["logit_loss"]]
    train = (f"**{b['steps']} bridge steps** ({b['tokens']:,} target tokens, {b['teacher_tokens']:,} teacher "
             f"tokens) from the chain-vocabulary {teacher}: {b['logit_weight']:g} x {kd} on character-aligned "
             f"positions + {b['ce_weight']:g} x cross-entropy, lr {b['lr']:g}, training {b['train']} parameters."
             if b["steps"] else "no bridge training (vocabulary transfer only).")
    return f"""
## Bridge to tokenizer `{recipe['request']['tokenizer']}`

The body is LInit's; the vocabulary ({v['tokenizer_size']:,} tokens, padded to {v['vocab_size']:,}: rows
{v['tokenizer_size']:,}..{v['vocab_size'] - 1:,} are never produced by the tokenizer) was initialised by FVT:
each token's bytes tokenised by the chain's tokenizer, its row the mean of those pieces' rows
({v['fvt']:,} tokens, {v['single_piece']:,} of them a single chain token). Special tokens copying the chain's
row of the same role: {v['special_mapped']}; tokens starting at the mean chain row: {v['mean_row']:,} and the
padding rows. Then {train}

| held-out loss (nats/token, `{b['corpus']}` held-out, target tokens) | |
|---|---|
| FVT alone | {b['heldout_loss_fvt']:.4f} |
| this checkpoint | {b['heldout_loss']:.4f} |
"""


# ---- a source of another family: sequence-level KD into an "anchor zero" ------------------------
class SeqKDOptions(BaseModel):
    """Anchor zero from a foreign model (METHOD.md 1.4): it writes text, the proxy learns it.

    The foreign teacher (Gemma-3-270M by default: another family, a 262k SentencePiece
    vocabulary) continues prompts drawn from the corpus; a model of the chain's family and
    tokenizer is trained on those texts with cross-entropy (sequence-level KD, Kim & Rush 2016).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    teacher: str = "gemma3-270m"
    prompts: int = Field(64, ge=1)
    prompt_words: int = Field(24, ge=1)
    new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    gen_batch: int = Field(8, ge=1)
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(128, ge=8)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    seed: int = 0


def corpus_prompts(text: str, n: int, words: int, seed: int) -> list[str]:
    """``n`` prompts of ``words`` words, each starting at a word boundary at a seeded position."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for start in rng.integers(0, max(1, len(text) - 64 * words), size=n):
        m = WORD_START.search(text, int(start))
        out.append(" ".join(text[m.start() + 1 if m else int(start):].split()[:words]))
    return out


@torch.no_grad()
def generate_texts(teacher: str, prompts: list[str], opts: SeqKDOptions, report=None) -> tuple[list[str], int]:
    """The foreign teacher's continuations of ``prompts`` (prompt + continuation), and its token count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cbd.assets import teacher_dir

    folder = teacher_dir(teacher)
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    texts, tokens = [], 0
    for k in range(0, len(prompts), opts.gen_batch):
        enc = tok(prompts[k: k + opts.gen_batch], return_tensors="pt", padding=True)
        torch.manual_seed(opts.seed * 1_000_003 + k)
        ids = model.generate(**enc, do_sample=True, temperature=opts.temperature, top_p=opts.top_p,
                             max_new_tokens=opts.new_tokens, pad_token_id=tok.pad_token_id)
        new = ids[:, enc["input_ids"].shape[1]:]  # (b, new_tokens)
        tokens += int(enc["attention_mask"].sum()) + new.numel()
        texts += [p + c for p, c in zip(prompts[k: k + opts.gen_batch],
                                         tok.batch_decode(new, skip_special_tokens=True), strict=True)]
        if report is not None:
            report({"stage": f"{teacher} writing", "fraction": min(1.0, (k + opts.gen_batch) / len(prompts))})
    return texts, tokens


def seq_kd(student, chain_tok, texts: list[str], opts: SeqKDOptions, *, eval_batches=(), report=None):
    """Train ``student`` in place on ``texts`` in the chain's tokenizer (cross-entropy only)."""
    from cbd.data import encode_documents, train_batches
    from cbd.distill import distill

    tokens = encode_documents(chain_tok, texts)
    cfg = DistillConfig(kl_weight=0.0, ce_weight=1.0, lr=opts.lr, warmup_steps=min(opts.warmup_steps, opts.steps),
                        batch_size=opts.batch_size, seq_len=min(opts.seq_len, len(tokens) - 1),
                        total_steps=opts.steps, eval_every=0, ckpt_every=0, seed=opts.seed, device="cpu")

    def batch(step: int) -> Tensor:
        return next(train_batches(tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=opts.seed,
                                  start_step=step))

    return distill(student, None, batch, list(eval_batches), cfg, progress=report or False)


def foreign_anchor_zero(spec: ModelSpec, chain_tok, corpus_name: str, opts: SeqKDOptions, *,
                        init_state: dict[str, Tensor] | None = None, report=None) -> tuple[dict[str, Tensor], dict]:
    """An anchor zero of ``spec`` (the chain's family and vocabulary) taught by a foreign model.

    ``init_state``: where the proxy starts (e.g. the chain's own source); random when None.
    Returns its state and what it cost (teacher tokens, training tokens, losses).
    """
    from cbd.data import eval_batches as fixed_batches

    prompts = corpus_prompts(corpus_text(corpus_name), opts.prompts, opts.prompt_words, opts.seed)
    texts, teacher_tokens = generate_texts(opts.teacher, prompts, opts, report)
    student = build_model(spec, init_state, seed=opts.seed)
    cut = len(texts) - max(1, len(texts) // 8) if len(texts) > 1 else 1  # the last eighth: held out
    from cbd.data import encode_documents

    held_tokens = encode_documents(chain_tok, texts[cut:])
    held = fixed_batches(held_tokens, batch_size=1, seq_len=min(opts.seq_len, len(held_tokens) - 1), num_batches=1)
    result = seq_kd(student, chain_tok, texts[:cut], opts, eval_batches=held, report=report)
    return state_of(student.eval(), spec), {
        "teacher": opts.teacher, "prompts": len(prompts), "teacher_tokens": teacher_tokens,
        "tokens": result.tokens, "steps": result.steps, "train_loss_first": round(result.train_loss[0], 4),
        "train_loss_last": round(result.train_loss[-1], 4),
        "heldout_generated_loss": [round(x, 4) for _, x in result.eval_loss], "sample": texts[0][:300]}
