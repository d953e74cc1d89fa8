"""``GET /chains``: built chains, their anchors and shapes, and which targets they can serve."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from redis import Redis
from redis.exceptions import RedisError
from rq.job import JobStatus

from app import schemas, views
from app.core.config import Settings
from app.deps import ReaderDep, RedisDep, SettingsDep, require_some_chain
from cbd.core import chainstore
from cbd.core.catalog import list_tokenizers
from cbd.core.manifest import AnchorEntry, ChainManifest
from cbd.core.plan import MAX_GROWTH
from worker import queue

router = APIRouter(tags=["chains"])


@router.get("/chains", response_model=schemas.ChainsResponse, responses={
    401: {"model": schemas.ErrorBody, "description": "no key, and reads need one (CBD_READ_KEYS_REQUIRED), or a wrong key"},
    500: schemas.CORRUPT})
async def get_chains(settings: SettingsDep, caller: ReaderDep, redis: RedisDep) -> schemas.ChainsResponse:
    """The built chains this caller may use (a key scoped to chains sees those and the public ones), and the
    builds in progress with their progress."""
    require_some_chain(caller, "the chain list")
    view = await run_in_threadpool(chains_view, settings, caller.chains)
    builds = await run_in_threadpool(builds_view, redis, settings, view, caller.chains)
    return view.model_copy(update={"builds": builds})


def builds_view(redis: Redis, settings: Settings, view: schemas.ChainsResponse,
                visible: frozenset[str] | None) -> list[schemas.ChainBuild]:
    """``chain-<recipe>`` jobs still running or waiting, for recipes not built yet (Redis down: none)."""
    from app.routes.jobs import waiting_view

    built = {c.name for c in view.chains}
    out = []
    try:
        for name in view.recipes:
            if name in built or (visible is not None and name not in visible):
                continue
            job = queue.fetch_job(redis, queue.chain_job_id(name))
            if job is None:
                continue
            v = views.job_view(job, "")
            if v.rq_status == JobStatus.DEFERRED.value:
                v = waiting_view(v, job)
            if v.status in ("queued", "started", "failed"):
                out.append(schemas.ChainBuild(chain=name, job=job.id, status=v.status, progress=v.progress,
                                              location=f"/jobs/{job.id}"))
    except RedisError:
        return []
    return out


def chains_view(settings: Settings, visible: frozenset[str] | None = None) -> schemas.ChainsResponse:
    """The chains (``visible`` only, when given), recipes and tokenizers."""
    chains = [chain_info(chainstore.load_manifest(n)) for n in chainstore.list_chains()
              if visible is None or n in visible]
    return schemas.ChainsResponse(default_chain=settings.default_chain, chains=chains,
                                  recipes=settings.recipes(), tokenizers=list_tokenizers())


def chain_info(m: ChainManifest) -> schemas.ChainInfo:
    sizes = sorted(a.size for a in m.anchors)
    base = m.base
    servable = schemas.ServableRange(
        family=base.family, model_type=base.model_type, vocab_size=base.vocab_size,
        head_dim=base.head_dim, min_non_embedding_params_interpolated=sizes[0],
        max_non_embedding_params_interpolated=sizes[-1],
        max_non_embedding_params=int(MAX_GROWTH * m.anchors[0].size))
    anchors = [schemas.AnchorInfo(name=a.name, parent=a.parent, spec=a.spec.model_dump(mode="json"),
                                  num_params=a.num_params, non_embedding_params=a.non_embedding_params,
                                  sha256=a.sha256, heldout_loss=heldout_loss(a)) for a in m.anchors]
    return schemas.ChainInfo(name=m.name, source=m.source, tokenizer=m.tokenizer, manifest_sha256=m.sha256,
                             anchors=anchors, servable=servable)


def heldout_loss(a: AnchorEntry) -> float | None:
    """The anchor's held-out loss as the chain build measured it (``metrics.heldout_loss``), if any."""
    loss = a.metrics.get("heldout_loss")
    return float(loss) if isinstance(loss, int | float) and not isinstance(loss, bool) else None
