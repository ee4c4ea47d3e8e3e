"""Upload an exported Hugging Face directory (weights, config, tokenizer, the model card) to a Hub repository:
`megamoe-convert moe-to-hf ... --push-to-hub ORG/NAME`.

    url = push_to_hub("hf/moe", "me/llama-moe-smol", private=True)

huggingface_hub's HfApi: create_repo(exist_ok=True), then one upload_folder commit of the whole directory. The token
is huggingface_hub's (HF_TOKEN, or `hf auth login`). `api` replaces HfApi (the tests pass one that writes into a
local directory: nothing here reaches the network in the test suite).
"""

from __future__ import annotations

import os

from huggingface_hub import HfApi

from megamoe.errors import InputError, OutputError

__all__ = ["push_to_hub"]


def push_to_hub(folder: str, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, api=None) -> str:
    """Upload `folder` to the model repository `repo_id` (created when missing); returns the commit URL (or the
    repository's, when the API returns none). Refuses a folder without config.json or README.md."""
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InputError(f"--push-to-hub: {repo_id!r} is not a repository id (expected ORG_OR_USER/NAME)")
    for f in ("config.json", "README.md"):
        if not os.path.isfile(os.path.join(folder, f)):
            raise InputError(f"{folder}: no {f}; push an export of megamoe-convert moe-to-hf")
    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"megamoe export ({os.path.basename(folder)})")
    except OSError as e:  # huggingface_hub's HTTP errors are OSErrors: name the repository, not a traceback
        raise OutputError(f"--push-to-hub {repo_id}: the upload failed ({e}); the export in {folder} is complete "
                          "and can be pushed again") from None
    return str(getattr(info, "commit_url", None) or info or f"{repo_id}")
