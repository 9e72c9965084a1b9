"""Turning a model reference from a config into a local folder.

A reference is either a local folder or a Hugging Face repository id such as
``mlabonne/OmniBeagle-7B``. A repository is downloaded once into the Hugging Face cache
(``HF_HOME``), and only the files a merge needs: the weights in one format (safetensors
when the repository has them, otherwise the ``.bin`` shards), the json files (config,
index, generation config, tokenizer config) and the tokenizer.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from pearl_edu.errors import HubError, ModelError

# What a repo id looks like: "owner/name", letters, digits, "-", "_" and ".".
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

METADATA_PATTERNS = ["*.json", "tokenizer.model", "tokenizer*", "*.tiktoken", "*.txt"]
SAFETENSORS_PATTERNS = ["model*.safetensors"]
BIN_PATTERNS = ["pytorch_model*.bin"]


def resolve_model(ref: str | Path, revision: str | None = None) -> Path:
    """The local folder of a model: ``ref`` itself, or the downloaded snapshot of a repo.

    A repository is taken at ``revision`` (a commit hash, branch or tag) when one is given,
    or at the revision written after an ``@`` as mergekit writes it
    (``mlabonne/OmniBeagle-7B@<commit>``), else at its latest commit. Raises `ModelError`
    for a path that does not exist and `HubError` for a repository that cannot be
    downloaded (offline, unknown, gated, no such revision), saying what to do.

    A reference that could be either, ``models/x`` where a folder ``models`` exists here,
    is tried as a repository, and when that fails too the error says both.
    """
    try:
        path = Path(ref).expanduser()
    except RuntimeError:  # "~name/..." where there is no user "name"
        raise ModelError(
            f"model folder {ref} does not exist (no home folder for {str(ref).split('/')[0]})"
        ) from None
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelError(f"model {ref}: is a file; expected a model folder or a repo id")
    text = str(ref)
    if "@" in text and revision is None:
        text, revision = text.rsplit("@", 1)
    if not looks_like_repo_id(text) or revision == "":
        raise ModelError(f"model folder {ref} does not exist")
    owner, name = text.split("/")
    try:
        return download(text, revision=revision)
    except HubError as err:
        if not Path(owner).is_dir():
            raise
        raise ModelError(
            f"model folder {ref} does not exist (the folder {owner} exists but holds no "
            f"{name}); if it was meant as a Hugging Face repo: {err}"
        ) from None


def looks_like_repo_id(ref: str) -> bool:
    """True for ``owner/name``; false for paths such as ``./x``, ``/x/y`` or ``~/x``."""
    return bool(REPO_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers a TCP connection within ``timeout`` seconds.

    False at once when ``HF_HUB_OFFLINE`` is set. Checking first spares an offline reader
    the client's minute of retries before the same answer.
    """
    from huggingface_hub import constants

    if _offline_by_choice():
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_by_choice() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def download(
    repo_id: str, revision: str | None = None, *, patterns: list[str] | None = None
) -> Path:
    """Download (or find in the cache) the files of ``repo_id`` that a merge needs.

    ``revision`` pins a commit (or branch or tag); ``None`` is the latest commit.
    ``patterns`` are the files to fetch instead of a model's (a LoRA adapter's, for
    `pearl_edu.adapters.resolve_adapter`).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    online = hub_reachable()
    try:
        if patterns is None:
            patterns = METADATA_PATTERNS + weight_patterns(
                repo_id, online=online, revision=revision
            )
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, local_files_only=not online
            )
        )
    except GatedRepoError:
        raise HubError(
            f"{repo_id}: the repository is gated; accept its terms on huggingface.co and "
            "log in with `hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"{repo_id}: no revision {revision!r} in the repository; give a commit hash, "
            "branch or tag listed on its 'Files and versions' page"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_id}: no such repository on the Hugging Face Hub (or it is private: "
            "log in with `hf auth login`); for a local model give a folder that exists"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        at = f" at revision {revision}" if revision else ""
        raise HubError(
            f"{repo_id}{at}: not in the Hugging Face cache ({hf_home()}) and the Hub cannot be "
            "reached (offline or HF_HUB_OFFLINE=1); download it once with a network, or "
            "give a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HubError(f"{repo_id}: download failed ({first_line[:200]})") from None


def weight_patterns(repo_id: str, *, online: bool = True, revision: str | None = None) -> list[str]:
    """Download one weight format only: safetensors if the repo has it, else ``.bin``.

    Offline the file list is unknown; both patterns are then given, and the cache
    holds whichever was downloaded before.
    """
    from huggingface_hub import list_repo_files

    if not online or _offline_by_choice():
        return SAFETENSORS_PATTERNS + BIN_PATTERNS
    try:
        files = list_repo_files(repo_id, revision=revision)
    except Exception:  # no network, or an error snapshot_download will report better
        return SAFETENSORS_PATTERNS + BIN_PATTERNS
    if any(name.startswith("model") and name.endswith(".safetensors") for name in files):
        return SAFETENSORS_PATTERNS
    return BIN_PATTERNS


def hf_home() -> str:
    """Where the Hugging Face cache lives, for messages."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
