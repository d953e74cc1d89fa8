"""Response models (the request model is ``cbd.core.request.InitRequest``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

Status = Literal["queued", "started", "finished", "failed", "cancelled"]
Kind = Literal["initialize", "build_chain"]


class ErrorBody(BaseModel):
    """Every error except request validation (which is FastAPI's ``{"detail": [...]}``)."""

    error: str = Field(description="exception class, e.g. ShapeError")
    message: str
    allowed: Any | None = Field(default=None, description="what would have been accepted")


CORRUPT = {"model": ErrorBody, "description": "a stored manifest or artifact index is corrupt (IntegrityError)"}


class ValidationProblem(BaseModel):
    """400/422: FastAPI's ``{"detail": ...}`` for malformed requests, or an ``ErrorBody`` for
    well-formed requests the library refuses (impossible shape, unknown chain or tokenizer)."""

    detail: list[dict[str, Any]] | str | None = None
    error: str | None = None
    message: str | None = None
    allowed: Any | None = None


class FileLink(BaseModel):
    url: str
    size: int
    sha256: str


class JobError(BaseModel):
    type: str = Field(description="exception class name")
    message: str
    status: int | None = Field(default=None, description="the HTTP status this error maps to")
    hub_status: int | None = Field(default=None, description="a Hub error's HTTP status from the Hub "
                                   "(none when it could not be reached)")
    hub_reason: str | None = Field(default=None, description="the Hub's own words for that status")


class JobFailure(ErrorBody):
    """A request whose job failed while it waited: the job's own error is ``cause``."""

    job_id: str | None = None
    cause: JobError | None = Field(default=None, description="the job's error; for a push the Hub refused or "
                                   "could not be reached, with the Hub's status and reason")


class PushInfo(BaseModel):
    repo_id: str
    revision: str
    commit_sha: str
    commit_url: str
    no_op: bool = Field(description="every file already matched: no commit was made")


class Job(BaseModel):
    """The answer of ``POST /initialize`` and ``GET /jobs/{id}``.

    ``id`` is what ``/jobs/{id}`` knows: the artifact id for a plain request, ``<artifact
    id>-push-<hex>`` for one that pushes to the Hub, ``chain-<name>`` for a chain build.
    ``files``, ``alpha`` and ``anchors`` appear once the checkpoint exists.
    """

    id: str
    kind: Kind = "initialize"
    status: Status
    rq_status: str | None = Field(default=None, description="rq's own status (deferred, scheduled...)")
    cancelled_by: str | None = Field(default=None, description="the key (its non-secret name) or address that "
                                     "cancelled the job; anyone may POST the same request again")
    owner: str | None = Field(default=None, description="the key (non-secret name) or address that created "
                              "the job: it, or an operator key, may cancel it")
    queue: str | None = None
    artifact_id: str | None = None
    chain: str | None = None
    message: str | None = None
    progress: dict[str, Any] | None = Field(default=None, description='e.g. {"stage": "interpolate", "fraction": 0.5}')
    error: JobError | None = None
    files: dict[str, FileLink] | None = None
    repo_id: str | None = Field(default=None, description="the init's name for Hub clients (HF_ENDPOINT=<service>): "
                                "`from_pretrained(repo_id)` fetches the init `main` stands for (calibrated alpha)")
    repo_revision: str | None = Field(default=None, description="the commit sha of exactly this init (its id, "
                                      "zero-padded to 40 hex): `from_pretrained(repo_id, revision=repo_revision)`")
    alpha: float | None = None
    alpha_source: str | None = None
    anchors: list[dict[str, Any]] | None = None
    target: dict[str, Any] | None = None
    card: dict[str, Any] | None = Field(
        default=None, description="the init card: step-0 loss on the chain's validation batch beside each "
                                  "single anchor's and a random init's, the alpha scheme and the repair")
    warnings: list[str] = Field(default_factory=list)
    push: PushInfo | None = None
    result: dict[str, Any] | None = Field(default=None, description="the job's return value")
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


class AnchorInfo(BaseModel):
    name: str
    parent: str | None
    spec: dict[str, Any]
    num_params: int
    non_embedding_params: int
    sha256: str
    heldout_loss: float | None = Field(default=None, description="nats/token on the chain's held-out text, "
                                                                 "when the build measured it")


class ServableRange(BaseModel):
    family: str
    model_type: str
    vocab_size: int
    head_dim: int = Field(description="fixed: hidden_size must be num_attention_heads * head_dim")
    min_non_embedding_params_interpolated: int = Field(description="below: a subset of the smallest anchor")
    max_non_embedding_params_interpolated: int = Field(description="above: the largest anchor grown")
    max_non_embedding_params: int = Field(description="hard limit (a multiple of the largest anchor)")


class ChainInfo(BaseModel):
    name: str
    source: str
    tokenizer: str
    manifest_sha256: str
    anchors: list[AnchorInfo]
    servable: ServableRange


class ChainBuild(BaseModel):
    """A chain being built (its ``chain-<name>`` job): what ``POST /initialize`` answers 202 with meanwhile."""

    chain: str
    job: str
    status: str
    progress: dict | None = None
    location: str


class ChainsResponse(BaseModel):
    default_chain: str
    chains: list[ChainInfo]
    builds: list[ChainBuild] = Field(default_factory=list, description="recipes being built (not yet in `chains`), "
                                     "with progress; e.g. the first chain after `cbd serve` on a fresh machine")
    recipes: list[str] = Field(description="recipes that can be built (<name>.toml in anchors/ or a CBD_RECIPES "
                                           "folder)")
    tokenizers: list[str] = Field(description="target tokenizers accepted besides each chain's own")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: str
    store: str
    chains: list[str]
    workers: int | None = None
    queues: dict[str, dict[str, int]] | None = None


class PlanAnchor(BaseModel):
    name: str
    shape: str = Field(description="layers x hidden, heads/kv heads, FFN")
    non_embedding_params: int
    heldout_loss: float | None = None


class PlanView(BaseModel):
    """``POST /plan``: what ``POST /initialize`` would make from the same body; nothing is enqueued."""

    id: str = Field(description="the artifact id (and job id) the request would get")
    chain: str
    cached: bool = Field(description="the checkpoint exists already: POST /initialize answers 200 at once")
    queue: str
    job: Literal["fast", "slow"] = Field(description="fast: interpolation, answered within the request "
                                                     "when it ends in time; slow: a bridge to another tokenizer")
    bridge: bool
    tokenizer: str
    target: dict[str, Any] = Field(description="the full target spec")
    num_params: int | None = Field(default=None, description="all parameters (unknown before a bridge: the "
                                                             "target tokenizer sets the vocabulary)")
    non_embedding_params: int
    weights_bytes: int | None = Field(default=None, description="size of the weights in model.safetensors "
                                                                "(parameters x bytes per value; header excluded)")
    dtype: str
    small: PlanAnchor | None = Field(default=None, description="smaller adjacent anchor (weight alpha)")
    big: PlanAnchor | None = Field(default=None, description="bigger adjacent anchor (weight 1 - alpha)")
    alpha: float = Field(description="the request's alpha, else alpha0 (calibration starts from it)")
    alpha_source: str = Field(description="request, distance (alpha0), calibrate or single-anchor")
    calibrate: bool
    card: bool = Field(default=True, description="the init card is measured (request field `card`)")
    warnings: list[str] = Field(default_factory=list)


class JobSummary(BaseModel):
    id: str
    kind: Kind
    status: Status
    queue: str | None = None
    chain: str | None = None
    artifact_id: str | None = None
    target: str | None = Field(default=None, description="layers x hidden, heads/kv heads, FFN")
    fraction: float | None = Field(default=None, description="progress, 0 to 1")
    stage: str | None = None
    enqueued_at: datetime | None = None
    ended_at: datetime | None = None


class JobList(BaseModel):
    """``GET /jobs``: the most recent jobs Redis still holds, newest first."""

    jobs: list[JobSummary]
