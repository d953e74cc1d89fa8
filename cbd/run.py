"""The one entry point for executing a plan: the LInit runner, or the bridge runner for another tokenizer.

Idempotent (an existing artifact is returned as is) and atomic (each runner works in a staging
folder that is renamed into place), so an RQ retry after a killed worker is always safe.
"""

from __future__ import annotations

from pathlib import Path

from cbd.core.artifacts import ArtifactInfo, load_artifact
from cbd.core.chainstore import ensure_local
from cbd.core.manifest import load_manifest
from cbd.core.plan import Plan
from cbd.errors import ChainNotBuiltError
from cbd.inits.publish import Progress


def run_plan(plan: Plan, *, progress: Progress | None = None, chains_root: Path | None = None,
             artifacts_root: Path | None = None) -> ArtifactInfo:
    existing = load_artifact(plan.id, artifacts_root)
    if existing is not None:
        return existing
    report = progress or (lambda _: None)
    # with an s3:// store, the chain is pulled into this host's cache first when it is not there yet
    manifest = load_manifest(plan.chain, chains_root) if chains_root is not None else \
        ensure_local(plan.chain, plan.manifest_sha256)
    if manifest.sha256 != plan.manifest_sha256:
        raise ChainNotBuiltError(f"chain {plan.chain!r} changed since this request was planned; send it again")
    if plan.bridge:
        from cbd.bridge.runner import run_bridge  # slow path: another tokenizer (imports the bridge's deps)

        return run_bridge(plan, manifest, progress=report, chains_root=chains_root, artifacts_root=artifacts_root)
    from cbd.inits.run import run_linit

    return run_linit(plan, manifest, progress=report, chains_root=chains_root, artifacts_root=artifacts_root)
