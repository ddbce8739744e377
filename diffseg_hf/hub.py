"""Upload selection and push/pull to the Hugging Face Hub.

Uploads are an allow-list (pipeline components, recipe, summaries, metrics, sample grids, classifier
folders) and never include training state (checkpoint-*/, .tmp-*, logs/, optimizer files). The folder itself
is written by `diffseg_hf.pipeline` / `diffseg_hf.export`, its README.md by `diffseg_hf.model_card`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import os
import shutil
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import CheckpointError, DiffsegError
from .export import CLASSIFIER_DIRS, IMAGE_SUFFIXES, TRAINING_STATE, check_pipeline_folder, is_training_state
from .export import export_segmenter, save_segmentation_pipeline  # noqa: F401  re-exported for older imports
from .model_card import CARD_MARKER, make_model_card
from .offline import hub_call, hub_unreachable
from .remote import REMOTE_DIR, write_remote_code

try:  # the HTTP backend of huggingface_hub 2.x: connection failures are not OSErrors there
    from httpx2 import TransportError as _TransportError
except ImportError:  # pragma: no cover
    _TransportError = ConnectionError

ROOT_FILES = ("recipe.yaml", "README.md", "*.json")  # plus the custom pipeline's .py
# never uploaded, whatever the allow-list says (also passed to upload_folder as ignore_patterns)
NEVER_UPLOAD = TRAINING_STATE
IGNORE_PATTERNS = [f"{prefix}{p}{suffix}" for p in NEVER_UPLOAD for prefix in ("", "*/") for suffix in ("", "/*")]
OFFLINE_HINT = "local folders work everywhere a Hub id does (diffseg sample --model DIR, from_pretrained(DIR))"


# what gets uploaded ---------------------------------------------------------------------------------
def _tree(folder: Path, sub: Path, images_only: bool = False) -> list[Path]:
    files = [p.relative_to(folder) for p in sorted((folder / sub).rglob("*")) if p.is_file()]
    return [p for p in files if not images_only or p.suffix.lower() in IMAGE_SUFFIXES]


def _selected(folder: Path, index: dict) -> list[Path]:
    """Existing files of the allow-list, minus NEVER_UPLOAD."""
    pipeline_file = f"{index['_class_name'][0]}.py" if isinstance(index.get("_class_name"), list) else None
    files = [Path(p.name) for p in sorted(folder.iterdir()) if p.is_file() and (
        p.name == pipeline_file or any(fnmatch.fnmatch(p.name, pat) for pat in ROOT_FILES))]
    components = [k for k, v in index.items() if isinstance(v, list) and k != "_class_name"]
    for d in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        if d in components or any(fnmatch.fnmatch(d, pat) for pat in CLASSIFIER_DIRS):
            files += _tree(folder, Path(d))
        elif d == "samples":
            files += _tree(folder, Path(d), images_only=True)
    return [f for f in files if not is_training_state(f)]


def _card_is_ours(folder: Path) -> bool:
    readme = folder / "README.md"
    return not readme.is_file() or CARD_MARKER in readme.read_text(errors="replace")


def _upload_plan(folder: Path, card: str) -> dict[Path, int]:
    """relative path -> bytes: the files push uploads, after it writes remote code and the card."""
    index = check_pipeline_folder(folder)
    plan = {f: (folder / f).stat().st_size for f in _selected(folder, index)}
    for rel in write_remote_code(folder, dry_run=True):
        source = REMOTE_DIR / rel.name if rel.name != "model_index.json" else folder / rel
        plan[rel] = source.stat().st_size
    if _card_is_ours(folder):
        plan[Path("README.md")] = len(card.encode())
    return dict(sorted(plan.items()))


def files_to_upload(folder: str | os.PathLike) -> list[Path]:
    """Relative paths `push_to_hub` uploads (README.md and any missing remote-code file included)."""
    return list(_upload_plan(Path(folder), card=""))

# push / pull ----------------------------------------------------------------------------------------
@dataclass
class UploadPlan:
    files: dict[Path, int]  # relative path -> bytes
    card: str
    url: str | None = None  # the commit URL once uploaded; None for a dry run


def _offline() -> bool:
    return constants.is_offline_mode() or constants._is_true(os.environ.get("HF_HUB_OFFLINE"))


def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) or ".." in repo_id:
        raise DiffsegError(f"{repo_id!r} is not a Hub repo id; use OWNER/NAME (e.g. alice/ddpm-fashion)")


@contextlib.contextmanager
def _hub_errors(repo_id: str, action: str, unreachable: str | None = None):
    """huggingface_hub exceptions -> one-line DiffsegErrors; `unreachable`: why the Hub probe failed, if it did."""
    try:
        yield
    except GatedRepoError:
        raise DiffsegError(f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}") from None
    except RepositoryNotFoundError:
        raise DiffsegError(f"repo {repo_id} not found (or private and your token cannot see it); check the id "
                           "or log in with `hf auth login`") from None
    except RevisionNotFoundError:
        raise DiffsegError(f"{repo_id}: no such revision; pass a branch, tag or commit of the repo") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, _TransportError, ConnectionError):
        reason = unreachable or ("HF_HUB_OFFLINE=1 is set" if _offline() else "no network connection")
        cached = " and it is not in the local cache" if action == "download" else ""
        raise DiffsegError(f"cannot {action} {repo_id}: the Hub cannot be reached ({reason}){cached}; "
                           f"{OFFLINE_HINT}") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise DiffsegError("the Hub rejected your token; log in again with `hf auth login`") from None
        if status == 403:
            raise DiffsegError(f"your token cannot write to {repo_id}; use a token with write access") from None
        raise DiffsegError(f"cannot {action} {repo_id}: {str(e).strip().splitlines()[0]}") from None


def prepare_upload(folder: str | os.PathLike, card: str) -> tuple[UploadPlan, list[str]]:
    """Write remote code and the card (unless README.md is the user's own) into the folder; returns the plan
    and the allow_patterns that make `upload_folder` pick exactly the plan's files."""
    folder = Path(folder)
    write_remote_code(folder)
    if _card_is_ours(folder):
        (folder / "README.md").write_text(card)
    plan = UploadPlan(_upload_plan(folder, card), card)
    return plan, [glob.escape(p.as_posix()) for p in plan.files]


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, dry_run: bool = False,
                token: str | None = None, license: str = "apache-2.0") -> UploadPlan:
    """Upload a pipeline folder (allow-list only) with a generated model card; `dry_run` touches neither the
    folder nor the network. A real push first writes remote code and README.md into the folder."""
    folder = Path(folder)
    _check_repo_id(repo_id)
    check_pipeline_folder(folder)
    card = make_model_card(folder, repo_id=repo_id, license=license)
    if dry_run:
        return UploadPlan(_upload_plan(folder, card), card)
    token = token or get_token()
    if not token:
        raise DiffsegError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN")
    unreachable = hub_unreachable()  # one short probe instead of a retried upload
    if unreachable:
        raise DiffsegError(f"cannot push to {repo_id}: the Hub cannot be reached ({unreachable}); {OFFLINE_HINT}")
    plan, allow = prepare_upload(folder, card)
    with _hub_errors(repo_id, "push to"):
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", allow_patterns=allow,
                                   ignore_patterns=IGNORE_PATTERNS, commit_message="Upload diffseg-hf pipeline")
    plan.url = str(commit)
    return plan


def pull_from_hub(repo_id: str, to: str | os.PathLike, *, revision: str | None = None) -> Path:
    """Download a Hub repo into folder `to` and check that it is a pipeline folder."""
    _check_repo_id(repo_id)
    with hub_call() as unreachable, _hub_errors(repo_id, "download", unreachable):
        if unreachable:  # offline, snapshot_download(local_dir=...) never reads the cache: copy the cached snapshot
            path = Path(to)
            shutil.copytree(snapshot_download(repo_id, revision=revision), path, dirs_exist_ok=True)
        else:
            path = Path(snapshot_download(repo_id, revision=revision, local_dir=to))
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"downloaded {repo_id} into {path}, but it holds no model_index.json: not a diffusers "
                              "pipeline")
    return path
