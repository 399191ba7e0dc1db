"""Resolve Hub ids (datasets, tokenizers, models) to a local mirror folder or the Hub itself.

A mirror root ``DIR`` holds each Hub repo ``org/name`` at ``DIR/org/name``, the layout that
``hf download org/name --repo-type dataset --local-dir DIR/org/name`` produces, so
the same ``datasets.load_dataset`` / ``from_pretrained`` call works on either. Offline
(``HF_HUB_OFFLINE``) without a mirror, a repo that the standard Hugging Face hub cache holds
(``<HF_HUB_CACHE>/<type>s--org--name/snapshots/<commit>``) is used from there, as the libraries
themselves would.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from moe_emergence.errors import UserError

log = logging.getLogger(__name__)

MIRROR_ENV = "MOE_HUB_MIRROR"

# Hub ids that no longer exist, mapped to a working replacement.
REMOVED_DATASETS = {
    "hendrycks/competition_math": (
        "was taken off the Hugging Face Hub in 2025 (DMCA notice); use its parquet mirror "
        "'EleutherAI/hendrycks_math' (one config per subject) instead"
    ),
}


class HubUnavailableError(UserError, ConnectionError):
    """The Hub cannot be reached and no mirror (nor the Hugging Face cache) holds the repo."""


class MirrorMissingError(UserError, FileNotFoundError):
    """The hub mirror is not a folder or lacks the requested repo."""


class LocalPathError(UserError, FileNotFoundError):
    """A local path given for a repo is missing or is a file, not a folder."""


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

# What each kind of repo is set by and what its folder must hold (for local-path errors).
_LOCAL_HINTS = {
    "tokenizer": ("--tokenizer (data.tokenizer)", "tokenizer.json", "'gpt2'"),
    "dataset": ("Dataset", "the dataset's files in Hub layout", "'openai/gsm8k'"),
    "model": ("Model", "config.json and the weights", "'gpt2'"),
}


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub repo id: ``name`` or ``org/name``."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def is_local_path(name: str) -> bool:
    """Whether ``name`` means a local path: not of Hub id form (absolute, ``./``, ``~``, two or
    more ``/``), or an existing file or folder."""
    return not is_hub_id(name) or os.path.lexists(os.path.expanduser(name))


def local_path_error(name: str, kind: str) -> LocalPathError:
    """The one-line error for a local path ``name`` that is missing or is not a folder."""
    what, holds, example = _LOCAL_HINTS.get(kind, _LOCAL_HINTS["model"])
    path = Path(name).expanduser()
    if path.exists():
        inside = path.name.endswith((".json", ".txt", ".model", ".safetensors", ".bin"))
        example = f" (e.g. '{path.parent}')" if inside else ""
        return LocalPathError(
            f"{what} '{name}' is a file, not a folder: pass the folder that holds {holds}{example}."
        )
    return LocalPathError(
        f"{what} '{name}': the folder does not exist. Pass an existing folder holding {holds}, "
        f"or a Hub name such as {example}."
    )


def default_mirror() -> str | None:
    """The mirror root from ``$MOE_HUB_MIRROR``, or None."""
    return os.environ.get(MIRROR_ENV) or None


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_is_offline(kind: str) -> bool:
    """The libraries' own rule: a dataset-specific / transformers switch, else HF_HUB_OFFLINE."""
    hub = bool(_env_flag("HF_HUB_OFFLINE"))
    if kind == "dataset":
        own = _env_flag("HF_DATASETS_OFFLINE")
        return hub if own is None else own
    return hub or bool(_env_flag("TRANSFORMERS_OFFLINE"))


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _how_to_fix(repo_id: str, kind: str) -> str:
    repo_type = " --repo-type dataset" if kind == "dataset" else ""
    return (
        f"Download it once where the Hub is reachable with `hf download {repo_id}{repo_type} "
        f"--local-dir <mirror>/{repo_id}` and pass `--hub-mirror <mirror>` "
        f"(config: data.hub_mirror, env: {MIRROR_ENV})."
    )


def check_hub_reachable(repo_id: str, kind: str = "dataset", timeout_s: float = 3.0) -> None:
    """Raise HubUnavailableError at once when the Hub can't serve ``repo_id``.

    Checks ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` and opens one TCP connection to the
    endpoint, so that a machine without network fails in seconds rather than after the
    libraries' ~25 s of retries.
    """
    if hub_is_offline(kind):
        raise HubUnavailableError(
            f"Cannot load {kind} '{repo_id}': offline mode is on (HF_HUB_OFFLINE/"
            f"HF_DATASETS_OFFLINE) and no hub mirror is set. {_how_to_fix(repo_id, kind)}"
        )
    endpoint = urlparse(_hub_endpoint())
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise HubUnavailableError(
            f"Cannot load {kind} '{repo_id}': the Hub at {host}:{port} is unreachable ({exc}) "
            f"and no hub mirror is set. {_how_to_fix(repo_id, kind)}"
        ) from exc


def resolve_repo(
    repo_id: str,
    mirror: str | os.PathLike | None,
    kind: str = "dataset",
    revision: str | None = None,
) -> str:
    """Return what to pass to ``load_dataset`` / ``from_pretrained`` for ``repo_id``.

    ``mirror`` None: ``$MOE_HUB_MIRROR`` (:func:`default_mirror`), else none.
    - with a mirror root, ``<mirror>/<repo_id>`` when ``repo_id`` is a Hub id and it exists;
    - else an existing local folder named ``repo_id`` (``~`` expanded), used as it is;
    - else, for a local path (:func:`is_local_path`), LocalPathError: missing, or a file;
    - else, with a mirror, MirrorMissingError (a FileNotFoundError);
    - else, offline, the Hugging Face hub cache's snapshot folder of ``revision`` when it
      holds one, and HubUnavailableError when not;
    - else the Hub id itself, after checking that the Hub is reachable.
    Removed Hub ids raise UserError naming a replacement.
    """
    if repo_id in REMOVED_DATASETS:
        raise UserError(f"Dataset '{repo_id}' {REMOVED_DATASETS[repo_id]}.")
    mirror = default_mirror() if mirror is None else mirror
    if mirror is not None:
        root = Path(mirror)
        if not root.is_dir():
            raise MirrorMissingError(
                f"Hub mirror root '{mirror}' is not a folder. Pass an existing folder to "
                f"--hub-mirror (config: data.hub_mirror, env: {MIRROR_ENV})."
            )
        local = root / repo_id
        if is_hub_id(repo_id) and local.is_dir():
            return str(local)
    path = Path(repo_id).expanduser()
    if path.is_dir():
        return str(path) if repo_id.startswith("~") else repo_id
    if is_local_path(repo_id):
        raise local_path_error(repo_id, kind)
    if mirror is not None:
        raise MirrorMissingError(
            f"{kind.capitalize()} '{repo_id}' is not in the hub mirror '{mirror}' "
            f"(looked for '{Path(mirror) / repo_id}'). {_how_to_fix(repo_id, kind)}"
        )
    if hub_is_offline(kind) and (snapshot := cached_snapshot(repo_id, kind, revision)):
        return str(snapshot)
    check_hub_reachable(repo_id, kind)
    return repo_id


def _hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(
    repo_id: str, kind: str = "dataset", revision: str | None = None
) -> Path | None:
    """The hub cache's snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or
    commit; default ``main``), or None when the cache holds no such non-empty snapshot.

    Reads the cache layout only (``refs/<revision>`` names the commit): no network.
    """
    repo_type = "dataset" if kind == "dataset" else "model"
    repo = _hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / (revision or "main")
    try:
        commit = ref.read_text().strip() if ref.is_file() else (revision or "")
        snapshot = repo / "snapshots" / commit
        if commit and snapshot.is_dir() and any(snapshot.iterdir()):
            return snapshot
    except OSError:
        pass
    return None


def hub_revision(repo_id: str, kind: str = "dataset", revision: str | None = None) -> str | None:
    """The commit the Hub serves for ``repo_id`` at ``revision`` (network), or None when
    offline or when the Hub cannot say (unreachable, gated, rate-limited)."""
    if hub_is_offline(kind):
        return None
    try:
        from huggingface_hub import HfApi

        repo_type = "dataset" if kind == "dataset" else "model"
        info = HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=10)
        return info.sha
    except Exception as exc:
        log.info("Could not resolve the Hub revision of %s (%s).", repo_id, exc)
        return None
