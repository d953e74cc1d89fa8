"""``POST /plan``: what ``POST /initialize`` would do with the same body, without doing it.

Torch-free and side-effect free (no job, no chain build, no API key needed): the anchors, alpha0,
parameter count, weight-file size and whether it is a fast or a slow job. The web page calls it
as the user types, so its errors are the API's own (the same checks as ``POST /initialize``).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from app import schemas
from app.core.config import Settings
from app.deps import Caller, ReaderDep, SettingsDep, check_chain
from app.routes.chains import heldout_loss
from app.routes.initialize import check_tokenizer, resolve_chain
from cbd.core import artifacts
from cbd.core.manifest import AnchorEntry
from cbd.core.plan import make_plan
from cbd.core.request import InitRequest
from cbd.errors import ChainNotBuiltError
from worker import queue

router = APIRouter(tags=["initialize"])
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@router.post("/plan", response_model=schemas.PlanView, response_model_exclude_none=True, responses={
    400: {"model": schemas.ValidationProblem, "description": "the body is not decodable JSON"},
    409: {"model": schemas.ErrorBody, "description": "the chain has a recipe but is not built yet "
                                                     "(POST /initialize would build it: a slow job)"},
    413: {"model": schemas.ValidationProblem, "content": {"text/plain": {"schema": {"type": "string"}}},
          "description": "the body exceeds 64 KiB"},
    401: {"model": schemas.ErrorBody, "description": "no key, and reads need one (CBD_READ_KEYS_REQUIRED), or a wrong key"},
    403: {"model": schemas.ErrorBody, "description": "the key is scoped to other chains"},
    422: {"model": schemas.ValidationProblem, "description": "bad shape, unknown field, chain or tokenizer"},
    500: schemas.CORRUPT,
}, summary="The plan POST /initialize would run (nothing is enqueued)")
async def post_plan(body: InitRequest, settings: SettingsDep, caller: ReaderDep) -> schemas.PlanView:
    """The same body as ``POST /initialize``; the answer says what that request would make and cost."""
    return await run_in_threadpool(plan_view, body, settings, caller)


def plan_view(body: InitRequest, settings: Settings, caller: Caller | None = None) -> schemas.PlanView:
    if caller is not None and body.chain is not None:
        check_chain(caller, body.chain, "this plan")
    name, chain, warnings = resolve_chain(body.chain, settings)
    if caller is not None:
        check_chain(caller, name, "this plan")
    if chain is None:
        raise ChainNotBuiltError(f"chain {name!r} is not built yet; POST /initialize would build it from its "
                                 "recipe first (a slow job, one per anchor)", allowed={"recipe": name})
    check_tokenizer(body.tokenizer, chain)
    p = make_plan(body, chain, bridge_options=settings.bridge_options())
    job_queue = queue.queue_for(p)
    bridge = p.bridge
    # A bridge changes the vocabulary: the embedding's size is known only once the tokenizer is loaded.
    num_params = None if bridge else p.target.num_params()
    return schemas.PlanView(
        id=p.id, chain=p.chain, cached=artifacts.load_artifact(p.id) is not None,
        queue=job_queue, job="slow" if job_queue == queue.SLOW else "fast", bridge=bridge, tokenizer=p.tokenizer,
        target=p.target.model_dump(mode="json"), num_params=num_params,
        non_embedding_params=p.target.non_embedding_params(),
        weights_bytes=None if num_params is None else num_params * DTYPE_BYTES[p.dtype], dtype=p.dtype,
        small=_anchor(chain.anchor(p.small)) if p.small else None,
        big=_anchor(chain.anchor(p.big)) if p.big else None,
        alpha=p.alpha, alpha_source=p.alpha_source, calibrate=p.calibrate, card=p.card,
        warnings=[*warnings, *p.warnings])


def _anchor(a: AnchorEntry) -> schemas.PlanAnchor:
    s = a.spec
    return schemas.PlanAnchor(name=a.name, shape=f"{s.num_hidden_layers}x{s.hidden_size} {s.num_attention_heads}/"
                                                 f"{s.kv_heads} {s.ffn}",
                              non_embedding_params=a.non_embedding_params, heldout_loss=heldout_loss(a))

