"""Plan, then execute: a request becomes a small serialisable plan. Torch-free.

The plan names the anchors, alpha, the Trans options and whether a bridge is needed; its hash
is the job id, the artifact folder name and the cache key.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cbd import __version__
from cbd.core.files import canonical_json
from cbd.core.manifest import AnchorEntry, ChainManifest
from cbd.core.names import NAME_PATTERN
from cbd.core.request import Architecture, Dtype, InitRequest
from cbd.core.spec import ModelSpec
from cbd.core.training import (
    BatchSize,
    Count,
    LossWeight,
    Lr,
    MinLrRatio,
    Seed,
    Steps,
    Trains,
    WarmupSteps,
    WindowLen,
)
from cbd.errors import ChainIncompatibleError, ShapeError

# Bump when the bytes a plan produces change for the same request: old artifacts stay valid
# under their old ids and new requests get new ids.
FORMAT_VERSION = 9  # 9: the residual channels a prune may drop are rotated onto their principal directions first (LInitOptions.carry); 8: the per-block search moves each group 0.125 either side of the grid's best (was: to 0, 0.5, 1), over up to 12 blocks within a budget (was: 6); 7: the per-block alpha search run on half the validation batch, checked on the other half; 6: the fading blend (LInitOptions.blend), its grid's interior; 5: the refit solved in float32, no interior alpha grid, the per-block search scored in bf16; 4: the in-situ repair computed layer by layer (repaired inits move by float rounding); 3: TransOptions.repair; 2: the id is the hash of the whole plan (cbd 0.1: of a summary)
# Largest target relative to the chain's largest anchor (non-embedding parameters).
MAX_GROWTH = 4.0

AlphaSource = Literal["request", "distance", "calibrate", "single-anchor"]  # Plan.alpha_source


class TransOptions(BaseModel):
    """How anchors are mapped onto the target shape (docs/method.md §3)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    depth_subset: Literal["importance", "even"] = "importance"
    depth_expand: Literal["identity", "copy"] = "identity"
    width_subset: Literal["importance", "prefix"] = "importance"
    width_expand: Literal["clone", "zero"] = "clone"
    repair: Literal["ridge", "none"] = Field(
        "ridge", description="ridge: the readers of pruned FFN neurons and query heads refit on the anchor's "
                             "calibration activations (cbd.repair); none: plain Trans")


class LInitOptions(TransOptions):
    """A plan's: :class:`TransOptions` and how LInit combines the two anchors' Trans. A recipe's
    ``[prune]`` is a plain TransOptions (a chain step maps one anchor; its dump is what a built
    chain's manifest is checked against, so it does not grow fields it has no use for)."""

    blend: Literal["fade", "plain"] = Field(
        "fade", description="fade: where the target has units the smaller anchor lacks, its term holds the "
                            "bigger anchor's units with their writes into the residual stream at 0 (the smaller "
                            "anchor's function exactly), so alpha fades them in; plain: Trans(S) fills them "
                            "(width_expand) and every parameter is blended")
    carry: Literal["pca", "none"] = Field(
        "pca", description="pca: before an anchor's residual width is pruned, the channels the prune may drop "
                           "(the bigger anchor's that the smaller lacks) are rotated onto their principal "
                           "directions on the chain's calibration text, function-preserving (cbd.repair.carry), "
                           "so the channels kept carry most of what the dropped ones held; none: the prune keeps "
                           "channels by importance")


class BridgeOptions(Trains):
    """How a target with another tokenizer is made (``cbd.bridge``, docs/method.md §4).

    The one place the bridge's defaults live; they are part of a bridge plan's hash. The
    defaults fit a ~30M-parameter target with the 50,257-entry GPT-2 vocabulary in under ten
    minutes on 2 CPU cores (docs/bridge.md). The optimisation settings it does not name (weight
    decay, betas, grad_clip) are ``cbd.core.training.Optimization``'s.
    """

    transfer: Literal["fvt"] = "fvt"
    pad_vocab_multiple: int = Field(64, ge=1, description="vocab_size rounded up to a multiple of this")
    teacher: Literal["source", "big", "linit"] = Field(
        "source", description="the chain-vocabulary model distilled from: the chain's source (a0), the "
                              "bigger adjacent anchor, or the LInit of the same target")
    train: Literal["all", "embeddings"] = "all"
    steps: Steps = Field(120, description="bridge distillation steps (0: vocabulary transfer only)")
    batch_size: BatchSize = 4
    seq_len: WindowLen = 128
    lr: Lr = 1e-3
    warmup_steps: WarmupSteps = 10
    min_lr_ratio: MinLrRatio = 0.1
    logit_loss: Literal["matched-kl", "uld"] = Field(
        "matched-kl", description="matched-kl: KL on the tokens both vocabularies share; uld: L1 of sorted "
                                  "probabilities (measured weaker, docs/bridge.md)")
    logit_weight: LossWeight = Field(1.0, description="weight of the token-aligned logit loss (0: CE only)")
    ce_weight: LossWeight = Field(1.0, description="weight of cross-entropy on the target tokens")
    uld_topk: Count = Field(128, description="sorted probabilities compared exactly; the rest as tail mass")
    corpus: str | None = Field(None, pattern=NAME_PATTERN,
                               description="training text; the chain recipe's corpus when omitted")
    eval_batches: Count = 4
    eval_batch_size: Count = 4
    eval_seq_len: WindowLen = 128
    seed: Seed = 0


class Plan(BaseModel):
    """What a runner does for one request. Its ``id`` is the hash of everything else in it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field("", description="content id: derived from the other fields (given: checked)")
    chain: str
    manifest_sha256: str
    target: ModelSpec
    small: str | None = Field(description="smaller adjacent anchor (weight alpha)")
    big: str | None = Field(description="bigger adjacent anchor (weight 1 - alpha)")
    alpha: float = Field(description="the request's alpha, else alpha0 (calibration starts from it)")
    alpha_requested: bool = Field(False, description="alpha came from the request")
    calibrate: bool = False
    alpha_scheme: Literal["blocks", "global"] = Field(
        "global", description="with calibrate: one alpha, or one per block of layers (cbd.inits.calibration)")
    card: bool = Field(True, description="the runner measures the init card (cbd.inits.calibration.init_card)")
    dtype: Dtype = "float32"
    tokenizer: str
    bridge_options: BridgeOptions | None = Field(default=None, description="set exactly for a bridge plan")
    trans: LInitOptions = LInitOptions()
    warnings: list[str] = Field(default_factory=list)
    code_version: str = __version__

    @model_validator(mode="after")
    def _content_id(self) -> Plan:
        want = self.content_id()
        if not self.id:
            object.__setattr__(self, "id", want)
        elif self.id != want:
            raise ValueError(f"plan id {self.id} does not match its content ({want}): the plan was altered")
        return self

    def content_id(self) -> str:
        """sha256 of the plan without its id and the code version (32 hex characters): the job id,
        the artifact folder and the cache key. FORMAT_VERSION is in it; the code version is not,
        so a release that makes the same bytes keeps serving the inits already made (``card`` counts
        only when it is off: it came later)."""
        skip = {"id", "code_version"} | ({"card"} if self.card else set())  # ids made before the field stay
        body = {"v": FORMAT_VERSION, **self.model_dump(mode="json", exclude=skip)}
        return hashlib.sha256(canonical_json(body).encode()).hexdigest()[:32]

    @property
    def bridge(self) -> bool:
        """Another tokenizer than the chain's: the bridge runner makes it."""
        return self.bridge_options is not None

    @property
    def alpha_source(self) -> AlphaSource:
        """Where the alpha of the init comes from (what the runner does with this plan)."""
        if self.small is None or self.big is None or self.small == self.big:
            return "single-anchor"
        if self.calibrate:
            return "calibrate"
        return "request" if self.alpha_requested else "distance"


def target_spec(arch: Architecture, base: ModelSpec) -> ModelSpec:
    """The chain's base spec with the requested shape; head dim must stay the chain's."""
    h = arch.num_attention_heads
    head_dim = arch.head_dim
    if head_dim is None:
        if arch.hidden_size % h:
            raise ShapeError(
                f"hidden_size {arch.hidden_size} is not divisible by num_attention_heads {h}",
                allowed={"hidden_size": f"a multiple of num_attention_heads ({h})"})
        head_dim = arch.hidden_size // h
    if head_dim != base.head_dim:
        raise ChainIncompatibleError(
            f"head dim {head_dim} (hidden_size {arch.hidden_size} / heads {h}) differs from the "
            f"chain's head dim {base.head_dim}: width changes are head-count changes, so use "
            f"hidden_size = num_attention_heads * {base.head_dim}",
            allowed={"head_dim": base.head_dim})
    kv = arch.num_key_value_heads or _default_kv(h, base)
    ffn = arch.intermediate_size or _default_ffn(arch.hidden_size, base)
    return base.with_shape(num_hidden_layers=arch.num_hidden_layers, hidden_size=arch.hidden_size,
                           num_attention_heads=h, num_key_value_heads=kv,
                           head_dim=head_dim, intermediate_size=ffn)


def make_plan(req: InitRequest, manifest: ChainManifest, *, tokenizer: str | None = None,
              bridge_options: BridgeOptions | None = None) -> Plan:
    """Resolve a request against a built chain (``bridge_options``: the bridge's budget, if one)."""
    target = target_spec(req.architecture, manifest.base)
    size = target.non_embedding_params()
    top = manifest.anchors[0].size
    if size > MAX_GROWTH * top:
        raise ShapeError(
            f"target has {size:,} non-embedding parameters, more than {MAX_GROWTH:g}x the chain's "
            f"largest anchor ({top:,})", allowed={"max_non_embedding_params": int(MAX_GROWTH * top)})
    small, big, warnings = adjacent_anchors(manifest, target)
    if small is not None and big is not None and small.name != big.name:
        alpha = req.alpha if req.alpha is not None else alpha0(small.size, big.size, size)
    else:
        alpha = 1.0 if small is not None else 0.0
        if req.alpha is not None and req.alpha not in (0.0, 1.0):
            warnings.append("alpha ignored: the target has a single adjacent anchor")
    # an explicit alpha is honoured; calibration needs two different anchors
    calibrate = req.calibrate and req.alpha is None and small is not None and big is not None \
        and small.name != big.name
    tok = req.tokenizer or manifest.tokenizer
    bridge = tok != manifest.tokenizer
    bopts = (bridge_options or BridgeOptions()) if bridge else None
    return Plan(chain=manifest.name, manifest_sha256=manifest.sha256, target=target,
                small=small and small.name, big=big and big.name, alpha=round(alpha, 6),
                alpha_requested=req.alpha is not None, calibrate=calibrate,
                alpha_scheme=req.alpha_scheme if calibrate else "global", card=req.card, dtype=req.dtype,
                tokenizer=tok,
                bridge_options=bopts, trans=LInitOptions(repair="ridge" if req.repair else "none", blend=req.blend,
                                                    carry=req.carry),
                warnings=warnings)


def adjacent_anchors(manifest: ChainManifest, target: ModelSpec
                     ) -> tuple[AnchorEntry | None, AnchorEntry | None, list[str]]:
    """(S, B): the anchors just below and above the target in non-embedding parameters.

    An anchor of exactly the target's shape is returned as both. Outside the chain's range one
    side is None and the plan extrapolates from the nearest anchor (with a warning).
    """
    for a in manifest.anchors:
        if a.spec.shape == target.shape:
            return a, a, []
    size = target.non_embedding_params()
    ordered = sorted(manifest.anchors, key=lambda a: a.size)
    below = [a for a in ordered if a.size <= size]
    above = [a for a in ordered if a.size > size]
    if not below:
        return ordered[0], None, [
            f"extrapolated: the target ({size:,} non-embedding parameters) is smaller than the "
            f"chain's smallest anchor {ordered[0].name} ({ordered[0].size:,}); it is a subset of "
            "that anchor alone"]
    if not above:
        return None, ordered[-1], [
            f"extrapolated: the target ({size:,} non-embedding parameters) is larger than the "
            f"chain's largest anchor {ordered[-1].name} ({ordered[-1].size:,}); it is that anchor "
            "grown function-preservingly"]
    return below[-1], above[0], []


def alpha0(n_small: int, n_big: int, n_target: int) -> float:
    """Relative distance in log-parameters (docs/method.md §2): 1 at S, 0 at B.

    >>> round(alpha0(10, 1000, 100), 3)
    0.5
    """
    return (math.log(n_big) - math.log(n_target)) / (math.log(n_big) - math.log(n_small))


def _default_kv(heads: int, base: ModelSpec) -> int:
    """Keep the chain's query-per-kv ratio where it divides; else the nearest divisor below."""
    want = max(1, round(heads / base.kv_group_size))
    return max(g for g in range(1, want + 1) if heads % g == 0)


def _default_ffn(hidden: int, base: ModelSpec) -> int:
    """The chain's FFN ratio, rounded to a multiple of 64 (at least 64)."""
    return max(64, round(hidden * base.ffn / base.hidden_size / 64) * 64)

