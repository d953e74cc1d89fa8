"""rq jobs and finished artifacts, as the ``schemas.Job`` the API answers with."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from rq.job import Job as RQJob
from rq.job import JobStatus
from rq.results import Result

from app import schemas
from app.errors import status_of
from cbd.core import artifacts, repo_ids
from cbd.core.artifacts import ArtifactInfo

# rq has more states than a client needs: waiting ones read as queued, dead ones as failed.
STATUS: dict[str, schemas.Status] = {
    JobStatus.CREATED: "queued", JobStatus.QUEUED: "queued", JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued", JobStatus.RATE_LIMITED: "queued",
    JobStatus.READY_TO_ENQUEUE: "queued", JobStatus.STARTED: "started",
    JobStatus.FINISHED: "finished", JobStatus.FAILED: "failed", JobStatus.STOPPED: "cancelled",
    JobStatus.CANCELED: "cancelled",
}
MAX_MESSAGE = 1000
ABANDONED = ("the worker running this job stopped before finishing it (killed, out of memory or restarted) "
             "on every try; nothing was published. POST /initialize again to start it anew")


def base_url(request: Request) -> str:
    public = request.app.state.settings.public_url
    return (public or str(request.base_url)).rstrip("/")


def job_path(request: Request, job_id: str) -> str:
    return request.app.url_path_for("get_job", job_id=job_id)


def file_links(info: ArtifactInfo, base: str) -> dict[str, schemas.FileLink]:
    return {name: schemas.FileLink(url=f"{base}/checkpoints/{info.id}/{name}", size=f.size, sha256=f.sha256)
            for name, f in sorted(info.files.items())}


def repo_fields(plan: dict[str, Any], artifact_id: str) -> dict[str, str | None]:
    """``repo_id`` and ``repo_revision``: the init as Hub clients name it (app/routes/hub.py)."""
    return {"repo_id": repo_ids.repo_id_of_plan(plan), "repo_revision": repo_ids.commit_of(artifact_id)}


def with_artifact(view: schemas.Job, info: ArtifactInfo, base: str) -> schemas.Job:
    """Fill the finished-checkpoint fields of ``view`` from ``artifact.json``."""
    return view.model_copy(update={
        **repo_fields(info.plan, info.id),
        "files": file_links(info, base), "alpha": info.alpha, "anchors": info.anchors,
        "alpha_source": info.alpha_source or info.plan.get("alpha_source"), "target": info.plan.get("target"),
        "card": (info.metrics or {}).get("card"),
        "warnings": [*view.warnings, *(w for w in info.warnings if w not in view.warnings)],
    })


def artifact_view(info: ArtifactInfo, base: str, *, chain: str | None = None,
                  warnings: list[str] | None = None) -> schemas.Job:
    """A checkpoint that already exists (no job needed)."""
    view = schemas.Job(id=info.id, status="finished", artifact_id=info.id,
                       chain=chain or info.plan.get("chain"), warnings=list(warnings or []))
    return with_artifact(view, info, base)


def job_view(job: RQJob, base: str, *, warnings: list[str] | None = None) -> schemas.Job:
    rq_status = job.get_status(refresh=False)
    status = STATUS.get(rq_status, "queued")
    meta = job.get_meta(refresh=False)
    kind = meta.get("kind") or ("build_chain" if job.id.startswith("chain-") else "initialize")
    view = schemas.Job(
        id=job.id, kind=kind, status=status, rq_status=str(rq_status.value), queue=job.origin,
        artifact_id=meta.get("artifact_id"), chain=meta.get("chain"), progress=meta.get("progress"),
        enqueued_at=job.enqueued_at, started_at=job.started_at, ended_at=job.ended_at,
        warnings=list(warnings or []), owner=meta.get("owner"))
    if status == "cancelled":
        return view.model_copy(update=cancelled(job))
    if status == "failed":
        return view.model_copy(update={"error": job_error(job)})
    if status != "finished":
        return view
    result = job.return_value()
    # An initialisation's result is shown expanded (files, alpha, push) from artifact.json.
    update: dict[str, Any] = {"result": result if isinstance(result, dict) and kind == "build_chain" else None}
    if isinstance(result, dict) and isinstance(result.get("push"), dict):
        push = result["push"]
        update["push"] = schemas.PushInfo(**{k: push.get(k) for k in schemas.PushInfo.model_fields})
    view = view.model_copy(update=update)
    info = artifacts.load_artifact(view.artifact_id) if view.artifact_id else None
    return with_artifact(view, info, base) if info else view


def cancelled(job: RQJob) -> dict:
    """The fields of a cancelled job's view: who cancelled it, and that a new request starts it anew."""
    record = job.get_meta(refresh=False).get("cancelled") or {}
    by = str(record.get("by") or "an operator")
    how = "while it was running (stopped at a progress point)" if job.started_at else "before it started"
    message = (f"job {job.id} was cancelled by {by} {how}; nothing was published. Anyone may POST the same "
               "request again to start it anew")
    return {"cancelled_by": by, "error": schemas.JobError(type="JobCancelledError", message=message, status=409)}


def job_error(job: RQJob) -> schemas.JobError:
    """The job's own clean error, else the last line of rq's exception text (never a traceback)."""
    err = job.get_meta(refresh=False).get("error")
    if isinstance(err, dict) and err.get("type"):
        status = err.get("status")  # written by workers before the API held the status map
        hub_status, hub_reason = err.get("hub_status"), err.get("hub_reason")
        return schemas.JobError(type=str(err["type"]), message=str(err.get("message", ""))[:MAX_MESSAGE],
                                status=status if isinstance(status, int) else status_of(str(err["type"])),
                                hub_status=hub_status if isinstance(hub_status, int) else None,
                                hub_reason=str(hub_reason)[:MAX_MESSAGE] if hub_reason else None)
    result = job.latest_result()
    text = result.exc_string if result is not None and result.type == Result.Type.FAILED else None
    if text and "AbandonedJobError" in text:  # rq: the worker died mid-job on the last try
        return schemas.JobError(type="AbandonedJobError", message=ABANDONED)
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        return schemas.JobError(type="JobFailed", message=f"job ended as {job.get_status(refresh=False).value}")
    kind, _, message = lines[-1].partition(": ")
    return schemas.JobError(type=kind.rsplit(".", 1)[-1].strip()[:200] or "Error", message=message[:MAX_MESSAGE])


def job_summary(job: RQJob) -> schemas.JobSummary:
    """One row of ``GET /jobs``: the target shape from the job's plan, progress from its meta."""
    rq_status = job.get_status(refresh=False)
    meta = job.get_meta(refresh=False)
    kind = meta.get("kind") or ("build_chain" if job.id.startswith("chain-") else "initialize")
    progress = meta.get("progress") if isinstance(meta.get("progress"), dict) else {}
    target = None
    try:
        plan = job.kwargs.get("plan") if isinstance(job.kwargs, dict) else None
    except Exception:  # a record this version cannot decode: shown without its shape
        plan = None
    if isinstance(plan, dict) and isinstance(plan.get("target"), dict):
        t = plan["target"]
        target = (f"{t.get('num_hidden_layers')}x{t.get('hidden_size')} {t.get('num_attention_heads')}/"
                  f"{t.get('num_key_value_heads') or t.get('num_attention_heads')} {t.get('intermediate_size')}")
    fraction = progress.get("fraction")
    status = STATUS.get(rq_status, "queued")
    return schemas.JobSummary(
        id=job.id, kind=kind, status=status, queue=job.origin, chain=meta.get("chain"),
        artifact_id=meta.get("artifact_id"), target=target,
        fraction=1.0 if status == "finished" else (float(fraction) if isinstance(fraction, int | float) else None),
        stage=str(progress["stage"])[:200] if progress.get("stage") is not None else None,
        enqueued_at=job.enqueued_at, ended_at=job.ended_at)
