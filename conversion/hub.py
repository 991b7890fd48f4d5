"""Publishing a checkpoint to the Hugging Face Hub.

Everything that can be wrong is checked before the first byte goes up: the token, the folder (a complete hf_mla
checkpoint: config, weights, modeling code, tokenizer) and an existing repo's model type. The token comes from the
environment (HF_TOKEN) or the user's `hf auth login` only; it is passed to huggingface_hub and never written to a file,
a log line or the card.
"""

import json
import os
from pathlib import Path

from transformers.utils import logging

from .export import model_type_of
from .sources import _read_index


logger = logging.get_logger(__name__)

MODEL_FILES = ("config.json", "configuration_hf_mla.py", "modeling_hf_mla.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
IGNORE = [".*", "**/.*", "*.tmp", "*.partial-*"]  # temp files of an interrupted write, dotfiles


class PushError(ValueError):
    """The push cannot go ahead; the message says why and what to do."""


def check_checkpoint(folder: str | os.PathLike) -> Path:
    """Refuse a folder that would upload as a broken model: config, weights (all shards of the index), modeling
    files and a tokenizer must be there."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder; pass the checkpoint folder that `hf-mla convert` wrote.")
    problems = [f"{n} is missing" for n in MODEL_FILES if not (folder / n).is_file()]
    try:
        model_type = model_type_of(folder)
    except ValueError as e:
        model_type = f"unreadable ({e})"
    if model_type not in (None, "hf_mla"):  # None: config.json missing, already listed
        problems.append(f"config.json has model_type {model_type!r}, not 'hf_mla'")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(_read_index(index).values())
        problems += [f"{s} (named in the index) is missing" for s in sorted(shards) if not (folder / s).is_file()]
    elif not (folder / "model.safetensors").is_file():
        problems.append("no weights (model.safetensors or model.safetensors.index.json with its shards)")
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        problems.append(f"no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    if problems:
        raise PushError(
            f"{folder} is not a complete hf_mla checkpoint: " + "; ".join(problems) + ". Push a folder written by "
            "`hf-mla convert` or `hf-mla heal` (or re-run it)."
        )
    return folder


def files_to_upload(folder: Path) -> list[tuple[str, int]]:
    """(path in repo, bytes) of every file the upload will send, as upload_folder filters them."""
    from fnmatch import fnmatch

    out = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and not any(fnmatch(rel, p) or fnmatch(f.name, p) for p in IGNORE):
            out.append((rel, f.stat().st_size))
    return out


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    commit_message: str | None = None,
    api=None,
) -> dict:
    """Upload a checkpoint folder to `repo_id` (created if needed). Returns what was (or, with dry_run, would be)
    uploaded and, after a real push, the commit URL. `api`: an `HfApi` (tests pass a fake)."""
    from huggingface_hub import HfApi, get_token

    folder = check_checkpoint(folder)
    if "/" not in repo_id or repo_id.count("/") > 1:
        raise PushError(f"repo id {repo_id!r} is not of the form 'owner/name'; e.g. 'my-user/smollm2-135m-mla'.")
    files = files_to_upload(folder)
    plan = {"repo_id": repo_id, "revision": revision, "private": private, "create_pr": create_pr, "files": files,
            "total_bytes": sum(n for _, n in files)}  # fmt: skip
    if dry_run:
        return plan
    if get_token() is None:
        raise PushError(
            "no Hugging Face token: set HF_TOKEN in the environment or run `hf auth login`, then push again "
            "(the token is never written anywhere by hf-mla)."
        )
    api = api or HfApi()
    if api.repo_exists(repo_id):
        existing = _remote_model_type(api, repo_id, revision)
        if existing not in (None, "hf_mla"):
            raise PushError(
                f"{repo_id} already holds a model of type {existing!r}; pushing an hf_mla checkpoint over it would "
                "mix two models. Choose another repo id."
            )
    else:
        api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    if (folder / "conversion_report.json").is_file():
        from .card import write_model_card

        write_model_card(folder, repo_id=repo_id)  # the usage snippet names the repo
        files = files_to_upload(folder)
    info = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr, ignore_patterns=IGNORE,
        commit_message=commit_message or f"Upload hf_mla checkpoint ({len(files)} files)",
    )  # fmt: skip
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None) or str(info)
    logger.info(f"Pushed {folder} to {repo_id}: {url}")
    return {**plan, "files": files, "url": url}


def _remote_model_type(api, repo_id: str, revision: str | None) -> str | None:
    """model_type of the config.json already in the repo, or None when it has none."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo_id, "config.json", revision=revision)
    except (EntryNotFoundError, RevisionNotFoundError):
        return None
    try:
        return json.loads(Path(path).read_text()).get("model_type")
    except json.JSONDecodeError:
        return "unreadable config.json"
