"""Tiny random chains for tests and examples: real files, real maps, no teacher.

``build_random_chain`` writes a chain exactly as ``cbd chain build`` does (anchors pruned by
importance from their parent and perturbed in place of distillation, alignments, importance,
validation tokens, a trained word-level tokenizer, the manifest last).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cbd import __version__
from cbd.core.manifest import ChainManifest, chain_dir, write_manifest
from cbd.core.spec import ModelSpec
from cbd.shape.importance import importance
from cbd.shape.linit import prune
from cbd.store.anchors import write_anchor
from cbd.tensors.writer import write_safetensors
from cbd.train.models import build_model, random_state

WORDS = ["the", "of", "and", "to", "a", "in", "that", "is", "was", "he", "for", "it", "with", "as", "his", "on", "be", "at", "by", "had", "not", "are", "but", "from", "or", "have", "an", "they", "which", "one", "you", "were", "her", "all", "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will", "more", "no", "if", "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some", "could", "time", "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must", "through"]


def tiny_tokenizer(folder: Path) -> int:
    """A word-level tokenizer over ``WORDS`` (+ specials) saved as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # a class transformers 4.57 knows too
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return len(vocab)


def tiny_spec(**kw) -> ModelSpec:
    base = dict(num_hidden_layers=4, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                head_dim=16, intermediate_size=96, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                norm_eps=1e-6, rope_theta=100000.0)  # not transformers' default: config round trips must keep it
    return ModelSpec(**(base | kw))


def tiny_gpt2_spec(**kw) -> ModelSpec:
    """A GPT-2-family spec with odd sizes (head dim 8, FFN 37, vocab 99); kv heads follow heads.

    ``norm_eps`` 1e-6 as ``tiny_spec``: residual expansion is exact up to the norm epsilon,
    whose weight grows by d_T / d (``cbd.shape.trans``); GPT-2's 1e-5 on a random model's unit-scale
    residual stream moves logits by ~1e-4 when d doubles.
    """
    base = dict(model_type="gpt2", num_hidden_layers=3, hidden_size=48, num_attention_heads=6,
                intermediate_size=37, vocab_size=99, max_position_embeddings=64, bos_token_id=1,
                eos_token_id=2, pad_token_id=2, norm_eps=1e-6)
    return ModelSpec(**(base | kw))


def build_random_chain(root: Path, name: str = "test", *, seed: int = 0,
                       specs: list[ModelSpec] | None = None) -> ChainManifest:
    """Three anchors, each a subset of the one before: 4x96 (6/2 heads), 3x64 (4/2), 2x32 (2/1);
    or ``specs`` (largest first, each a subset of the one before; vocabulary at least 96)."""
    g = torch.Generator().manual_seed(seed)
    specs = specs or [tiny_spec(),
                      tiny_spec(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64),
                      tiny_spec(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                intermediate_size=40)]
    cdir = chain_dir(name, root)
    cdir.mkdir(parents=True, exist_ok=True)
    tiny_tokenizer(cdir / "tokenizer")
    calib = torch.randint(3, len(WORDS) + 3, (4, 33), generator=g)
    write_safetensors(cdir / "validation.safetensors", {"tokens": torch.randint(3, len(WORDS) + 3, (8, 33), generator=g)})
    state = {k: v + (1.0 if "embed" in k else 0.05) * torch.randn(v.shape, generator=g)
             for k, v in random_state(specs[0], seed).items()}
    entries, parent, align, imp = [], None, None, None
    for i, spec in enumerate(specs):
        if i:
            state, align = prune(state, specs[i - 1], imp, spec)
            state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}  # "distilled"
        imp = importance(build_model(spec, state), spec, calib)
        entries.append(write_anchor(root, name, f"a{i}", spec, state, importance=imp, alignment=align,
                                    parent=parent, metrics={"note": "random, for tests"}))
        parent = f"a{i}"
    manifest = ChainManifest(name=name, source="random", tokenizer=f"{name}-words", anchors=entries,
                             code_version=__version__, recipe={"kind": "random-test-chain", "seed": seed})
    write_manifest(manifest, root)
    return manifest
