"""Text tokenized by both tokenizers, with the positions where both end a token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cbd.core.plan import BridgeOptions
from cbd.data.corpora import WORD_START
from cbd.errors import AssetUnavailableError


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


def heldout_batches(corpora: str | list[str], tokenizer: str, opts: BridgeOptions) -> list[Tensor]:
    """Held-out windows in the *target* tokenizer, from each corpus' held-out work: ``eval_batches``
    split evenly over the corpora (at least one each), one corpus after the other, so the cost is
    that of one corpus and the mean loss is the mean over domains."""
    from cbd.data import batches as data

    names = [corpora] if isinstance(corpora, str) else list(corpora)
    out = []
    for name in names:
        tokens = data.token_file(name, tokenizer, "heldout")
        out += data.eval_batches(tokens, batch_size=opts.eval_batch_size, seq_len=opts.eval_seq_len,
                                 num_batches=max(1, opts.eval_batches // len(names)), seed=opts.seed)
    return out
