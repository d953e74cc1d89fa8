"""``GET /chains``: built chains, their anchors and shapes, and which targets they can serve."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from app import schemas
from app.core.config import Settings
from app.deps import SettingsDep
from cbd.core import chainstore
from cbd.core.catalog import list_tokenizers
from cbd.core.manifest import AnchorEntry, ChainManifest
from cbd.core.plan import MAX_GROWTH

router = APIRouter(tags=["chains"])


@router.get("/chains", response_model=schemas.ChainsResponse, responses={500: schemas.CORRUPT})
async def get_chains(settings: SettingsDep) -> schemas.ChainsResponse:
    return await run_in_threadpool(chains_view, settings)


def chains_view(settings: Settings) -> schemas.ChainsResponse:
    chains = [chain_info(chainstore.load_manifest(n)) for n in chainstore.list_chains()]
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
