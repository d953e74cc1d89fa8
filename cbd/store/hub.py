"""The one place that talks to the Hugging Face Hub: push a checkpoint folder as one atomic commit.

    >>> push_folder(Path("out/llama-60m"), "alice/llama-60m", token=os.environ["HF_TOKEN"])
    PushResult(repo_id='alice/llama-60m', revision='main', commit_sha='9c1e...', no_op=False, ...)

Every failure is a ``HubError`` subclass whose message says what to do next and never contains
the token (``scrub``). Large files go through Xet when hf-xet is installed (huggingface_hub's
default) and through LFS otherwise; the tests exercise the LFS path only, against a local
Hub-compatible server (``tests/hubserver.py``), since the Xet storage cannot be reached offline.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, RepoFile, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import sha as hf_sha

from cbd.core.files import sha256_file
from cbd.errors import (
    HubAuthError,
    HubConflictError,
    HubError,
    HubNotFoundError,
    HubPermissionError,
    HubUnavailableError,
    InvalidPushError,
    InvalidRepoIdError,
)

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
# One part of a repo id, as the Hub accepts it: ASCII letters, digits, '-', '_', '.', 1 to 96 chars,
# not starting or ending with '-' or '.' (huggingface_hub.utils.validate_repo_id, applied per part).
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")
_COMMIT_OID = re.compile(r"[0-9a-fA-F]{5,40}")
_SKIPPED_DIRS = {".git", ".cache"}  # huggingface_hub's FORBIDDEN_FOLDERS: never pushed


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit_sha: str  # the revision's head after the push (unchanged when ``no_op``)
    commit_url: str
    no_op: bool  # every local file already matched the revision: no commit was made
    files: list[str] = field(default_factory=list)  # the folder's files, as paths in the repo


# -- public verbs ----------------------------------------------------------------------------------


def scrub(text: str, token: str | None) -> str:
    """``text`` with every occurrence of ``token`` masked: ``scrub("bad hf_abc", "hf_abc") == "bad ***"``."""
    return text.replace(token, "***") if token else text


def validate_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a valid ``namespace/name``; raise ``InvalidRepoIdError`` otherwise."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    problem = None
    if len(parts) != 2:
        problem = "it must be exactly 'namespace/name' (one '/')"
    elif not all(_REPO_PART.fullmatch(p) for p in parts):
        problem = (
            "each part must be 1-96 ASCII letters, digits, '-', '_' or '.', "
            "and must not start or end with '-' or '.'"
        )
    elif "--" in repo_id or ".." in repo_id:
        problem = "it must not contain '--' or '..'"
    elif repo_id.endswith(".git"):
        problem = "it must not end with '.git'"
    if problem:
        raise InvalidRepoIdError(f"Invalid Hub repo id {repo_id!r}: {problem}, e.g. 'alice/llama-60m'.")
    return repo_id


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    token: str | None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str = "main",
    parent_commit: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Push every file of ``folder`` to ``repo_id@revision`` in one atomic commit.

    Creates the repo (``private`` only applies to a new repo) and the branch when missing. With
    ``parent_commit`` the commit is conditional: ``HubConflictError`` if the branch moved. When
    every file already matches the revision nothing is committed and ``no_op`` is True (as in
    huggingface_hub, this holds even when ``parent_commit`` is stale: the content is there, so a
    retried push is idempotent, and needs only read access). Remote files absent from ``folder``
    are left in place.
    ``token=None`` uses the locally saved token (``HF_TOKEN`` or ``hf auth login``).
    """
    validate_repo_id(repo_id)
    files = _local_files(Path(folder))
    if parent_commit is not None and not _COMMIT_OID.fullmatch(parent_commit):
        raise InvalidPushError(
            f"parent_commit {parent_commit!r} is not a commit id (5 to 40 hex characters)."
        )
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    secret = token or get_token()  # what to scrub, even when the token came from the environment
    api = HfApi(endpoint=endpoint, token=token, library_name="cbd")
    message = commit_message or f"Upload {len(files)} files with cbd"
    try:
        return _push(
            api, repo_id, files, revision, private=private, parent_commit=parent_commit, message=message
        )
    except HubError:
        raise
    except Exception as exc:  # every failure leaves as a HubError, the token scrubbed from its text
        where = f"{repo_id}@{revision}"
        logger.debug("push to %s failed:\n%s", where, scrub(traceback.format_exc(), secret))
        raise _translate(
            exc, where=where, endpoint=endpoint, parent_commit=parent_commit, token=secret
        ) from None


# -- steps -----------------------------------------------------------------------------------------


def _local_files(folder: Path) -> dict[str, Path]:
    """Path in repo -> local file, sorted; hidden ``.git``/``.cache`` folders are left out."""
    if not folder.is_dir():
        raise InvalidPushError(f"Cannot push {str(folder)!r}: it is not a directory.")
    files = {
        p.relative_to(folder).as_posix(): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not _SKIPPED_DIRS.intersection(p.relative_to(folder).parts[:-1])
    }
    if not files:
        raise InvalidPushError(f"Cannot push {str(folder)!r}: it holds no files.")
    return files


def _push(
    api: HfApi, repo_id: str, files: dict[str, Path], revision: str, *, private, parent_commit, message
):
    where = f"{repo_id}@{revision}"
    head = _prepare(api, repo_id, revision=revision, private=private)
    if _unchanged(api, repo_id, head, files):
        logger.info("push to %s: all %d files unchanged at %s, no commit", where, len(files), head[:8])
        url = f"{api.endpoint}/{repo_id}/commit/{head}"
        return PushResult(repo_id, revision, head, url, no_op=True, files=list(files))
    logger.info("push to %s: one commit of %d files", where, len(files))
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files.items()]
    info = api.create_commit(
        repo_id, operations, commit_message=message, revision=revision, parent_commit=parent_commit
    )
    # huggingface_hub itself skips the commit when the files became identical meanwhile, and then
    # returns the current head: no new commit means the head we saw.
    return PushResult(repo_id, revision, info.oid, info.commit_url, no_op=info.oid == head, files=list(files))


def _prepare(api: HfApi, repo_id: str, *, revision: str, private: bool) -> str:
    """Create the repo and the branch if missing; return the branch head's commit sha.

    The repo is looked up before ``create_repo``: in huggingface_hub 2.4, ``create_repo(exist_ok=True)``
    on an existing repo whose namespace the token cannot write to builds ``RepoUrl`` without the
    endpoint and raises ``ValueError`` on any endpoint but huggingface.co.
    """
    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.repo_info(repo_id)
    if private and not info.private:
        raise HubConflictError(
            f"{repo_id} already exists and is public, but private=True was asked: make it private on the"
            " Hub first, or push with private=False."
        )
    if revision == "main":
        return info.sha
    try:
        return api.repo_info(repo_id, revision=revision).sha
    except RevisionNotFoundError:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.repo_info(repo_id, revision=revision).sha


def _unchanged(api: HfApi, repo_id: str, head: str, files: dict[str, Path]) -> bool:
    """True when every local file is byte-identical to the same path at commit ``head``."""
    tree = api.list_repo_tree(repo_id, revision=head, recursive=True)
    remote = {f.path: f for f in tree if isinstance(f, RepoFile)}
    for path, local in files.items():
        entry = remote.get(path)
        if entry is None or entry.size != local.stat().st_size:
            return False
        data_hash = sha256_file(local) if entry.lfs is not None else hf_sha.git_hash(local.read_bytes())
        if data_hash != (entry.lfs.sha256 if entry.lfs is not None else entry.blob_id):
            return False
    return True



def _translate(exc: Exception, *, where: str, endpoint: str, parent_commit: str | None, token) -> HubError:
    """Map a huggingface_hub / transport failure to a HubError with a remedy, token scrubbed.

    Each error carries the Hub's HTTP status (``hub_status``, None when it was not reached) and its
    own words for it (``hub_reason``), so a caller of the service sees what the Hub said.
    """
    detail = scrub(" ".join(str(exc).split()), token)
    if isinstance(exc, (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError)):
        return HubUnavailableError(
            f"Cannot reach the Hub at {endpoint} while pushing {where}: check the network and the"
            f" endpoint (HF_ENDPOINT), then retry. ({type(exc).__name__}: {detail})"
        )
    status = (
        exc.response.status_code if isinstance(exc, HfHubHTTPError) and exc.response is not None else None
    )
    reason = _reason(exc, token)
    said = {"hub_status": status, "hub_reason": reason}
    tokens_url = f"{endpoint}/settings/tokens"
    if status == 401 and token is None:
        return HubAuthError(
            f"No Hub token was given for pushing {where} (401): pass token=, or set HF_TOKEN to an"
            f" access token with write scope (create one at {tokens_url}).", **said
        )
    if status == 401 and "Invalid credentials" in detail:
        return HubAuthError(
            f"The Hub at {endpoint} rejected the token while pushing {where} (401: {reason}): pass a"
            f" valid access token with write scope (create one at {tokens_url}), or set HF_TOKEN.", **said
        )
    if status == 403:
        return HubPermissionError(
            f"The Hub refused this token writing to {where} (403: {reason}): push into your own namespace"
            f" or an organisation where you have write access, or use a token with write scope ({tokens_url}).",
            **said,
        )
    if status in (401, 404):
        return HubNotFoundError(
            f"{where} was not found or is not visible to this token ({status}): check the repo id and"
            f" revision, and that the token is valid and belongs to the repo's owner. ({detail})", **said
        )
    if status == 412:
        return HubConflictError(
            f"{where} has moved past parent_commit {parent_commit} (412): fetch the current head"
            " (HfApi.repo_info(...).sha), check what changed, and push again with that parent.", **said
        )
    if status == 409:
        return HubConflictError(
            f"A concurrent operation conflicts with the push to {where} (409): retry. ({detail})", **said
        )
    if status in (429, 502, 503, 504):
        return HubUnavailableError(
            f"The Hub at {endpoint} is overloaded or down ({status}: {reason}) while pushing {where}:"
            " retry later.", **said
        )
    if isinstance(exc, ValueError):  # e.g. invalid README metadata, malformed parent commit
        return InvalidPushError(f"The Hub refused the push to {where}: {detail}", **said)
    return HubError(f"Pushing {where} to {endpoint} failed ({status or type(exc).__name__}): {detail}", **said)


def _reason(exc: Exception, token: str | None, limit: int = 300) -> str | None:
    """The Hub's own message (``X-Error-Message`` / JSON ``error``), one line, scrubbed, bounded."""
    text = getattr(exc, "server_message", None)
    if not text:
        return None
    text = scrub(" ".join(str(text).split()), token)
    return text if len(text) <= limit else text[:limit] + "..."
