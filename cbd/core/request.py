"""What a user asks for: the body of ``POST /initialize`` and of ``cbd init``/``cbd fetch``.

Torch-free and pydantic, because it crosses process boundaries (HTTP body, job payload,
recipe file). Secrets never travel here: a Hub token comes only in a header (422 bodies echo
the input).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cbd.core.names import NAME_PATTERN
from cbd.core.spec import MAX_FFN, MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_LAYERS

Dtype = Literal["float32", "bfloat16", "float16"]
# Hub repo ids: namespace/name, letters, digits, '-', '_', '.', no '..', no leading/trailing -/.
REPO_ID_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"


class Architecture(BaseModel):
    """The target shape. Fields the chain fixes (vocabulary, RoPE base, norms) come from it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_hidden_layers: int = Field(ge=1, le=MAX_LAYERS, examples=[4])
    hidden_size: int = Field(ge=1, le=MAX_HIDDEN, examples=[256])
    num_attention_heads: int = Field(ge=1, le=MAX_HEADS, examples=[4])
    num_key_value_heads: int | None = Field(default=None, ge=1, le=MAX_HEADS, examples=[2])
    intermediate_size: int | None = Field(default=None, ge=1, le=MAX_FFN, examples=[512])
    head_dim: int | None = Field(default=None, ge=2, le=MAX_HEAD_DIM)


class PushToHub(BaseModel):
    """Where to push the finished checkpoint. The token travels in ``X-HF-Token`` only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo_id: str = Field(pattern=REPO_ID_PATTERN, max_length=96 * 2 + 1, examples=["me/tiny-init"])
    private: bool = False
    revision: str = Field(default="main", pattern=REVISION_PATTERN)

    @field_validator("repo_id", "revision")
    @classmethod
    def _no_dots(cls, v: str) -> str:
        if ".." in v or v.endswith((".git", "/")):
            raise ValueError("must not contain '..' or end with '.git' or '/'")
        return v


class InitRequest(BaseModel):
    """``POST /initialize``: a shape, optionally a chain, tokenizer, alpha, dtype and Hub target."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chain: str | None = Field(default=None, pattern=NAME_PATTERN,
                              description="chain name; the service's default chain when omitted")
    architecture: Architecture
    tokenizer: str | None = Field(default=None, pattern=NAME_PATTERN,
                                  description="target tokenizer; the chain's when omitted")
    alpha: float | None = Field(default=None, ge=0.0, le=1.0,
                                description="weight of the smaller anchor; from relative distance when omitted")
    calibrate: bool = Field(default=True,
                            description="pick alpha from a grid around alpha0 (and both single anchors) by "
                                        "loss on the chain's validation batch, forward passes only; false: alpha0")
    alpha_scheme: Literal["blocks", "global"] = Field(
        default="blocks",
        description="with calibrate: blocks (an alpha per block of layers and one for the embeddings, "
                    "from the global grid's best, by coordinate descent on the validation batch) or "
                    "global (one alpha)")
    repair: bool = Field(default=True,
                         description="refit the projections that read pruned units (down_proj, o_proj) by ridge "
                                     "least squares on the anchor's calibration activations (no teacher, no "
                                     "gradients); false: plain Trans")
    blend: Literal["fade", "plain"] = Field(
        default="fade",
        description="fade: the smaller anchor's term holds the bigger anchor's units that it lacks, their "
                    "writes into the residual stream at 0, so alpha fades them in (its loss is often lowest "
                    "between the anchors); plain: the smaller anchor grown by clones of its own units, every "
                    "parameter blended (cbd before 0.2)")
    carry: Literal["pca", "none"] = Field(
        default="pca",
        description="pca: where an anchor's residual width is pruned, the channels the prune may drop are "
                    "first rotated onto their principal directions on the chain's calibration text "
                    "(function-preserving), so the channels kept carry most of what the dropped ones held; "
                    "none: the prune keeps channels by importance (inits of format 8 and before)")
    card: bool = Field(
        default=True,
        description="measure the init card: the init's step-0 loss on the chain's validation batch beside the "
                    "best single anchor's and a random init's (forward passes of the target: most of what a "
                    "miss costs when calibrate and repair are off); false: no card, the cheapest miss")
    dtype: Dtype = "float32"
    push_to_hub: PushToHub | None = None

