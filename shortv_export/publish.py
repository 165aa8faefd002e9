"""Stage 7, publish: upload the finished output folder to the Hub with huggingface_hub.

The token comes from HF_TOKEN or the saved login (`hf auth login`) and is never printed, logged or written;
HF_ENDPOINT is honoured. Files the Hub already holds with the same content are skipped, so a re-run uploads only
what changed (and makes no commit when nothing did). Every failure is a ShortVError that says the local folder
is intact and how to retry.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from .errors import ShortVError
from .util import hub_offline, one_line


@dataclass
class PushResult:
    repo_id: str
    url: str  # the commit (or pull request) URL
    commit: str | None
    uploaded: bool  # False when the Hub already had every file


def check_push_options(revision: str | None, create_pr: bool) -> None:
    """huggingface_hub opens pull requests against main only: refuse --create-pr with another --revision."""
    if create_pr and revision not in (None, "main"):
        raise ShortVError("--create-pr opens a pull request against main: drop --revision (or --create-pr)")


class Publisher:
    """One push: checks offline mode and the token when made and the endpoint with ``check`` (before anything is
    written), resolves the repo id, uploads the folder once ``written_to`` says it is there."""

    def __init__(
        self, folder: str | Path, *, repo_id=None, private=False, revision=None, create_pr=False, written=True
    ):
        from huggingface_hub import HfApi, get_token

        self.folder = Path(folder)
        self.written = written  # False: made before the conversion writes ``folder``
        self._user = None
        self.private, self.revision, self.create_pr = private, revision, create_pr
        self.repo_id = repo_id
        check_push_options(revision, create_pr)
        if hub_offline():
            raise ShortVError(self.failed("the Hub is in offline mode (HF_HUB_OFFLINE=1); unset it"))
        token = get_token()  # HF_TOKEN, then the saved login; never printed
        if not token:
            raise ShortVError(self.failed("no Hub token: set HF_TOKEN or run `hf auth login` (write access)"))
        self.api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)

    def check(self) -> None:
        """The endpoint answers and takes the token (whoami): a push that cannot work fails before the conversion."""
        with _hub_errors(self):
            self._user = self.api.whoami()["name"]

    def written_to(self, folder: str | Path) -> None:
        """The output folder is complete: failures from now on keep it and say how to retry."""
        self.folder, self.written = Path(folder), True

    def resolve_repo_id(self) -> str:
        """``--repo-id``, or ``<token user>/<folder name>``."""
        if self.repo_id is None:
            if self._user is None:
                self.check()
            self.repo_id = f"{self._user}/{self.folder.name}"
        return self.repo_id

    def push(self, commit_message: str | None = None) -> PushResult:
        repo_id = self.resolve_repo_id()
        with _hub_errors(self):
            self.api.create_repo(repo_id, private=self.private, exist_ok=True, repo_type="model")
            if self.revision not in (None, "main"):
                self.api.create_branch(repo_id, branch=self.revision, exist_ok=True)
            before = _head(self.api, repo_id, self.revision)
            info = self.api.upload_folder(
                repo_id=repo_id,
                folder_path=self.folder,
                revision=self.revision,
                create_pr=self.create_pr,
                commit_message=commit_message or f"Upload ShortV checkpoint {self.folder.name} with shortv-export",
            )
        url = info.pr_url or info.commit_url
        return PushResult(repo_id, url, info.oid, uploaded=self.create_pr or info.oid != before)

    def retry_command(self) -> str:
        args = ["hf", "upload", self.repo_id or f"<user>/{self.folder.name}", str(self.folder), "."]
        if self.revision:
            args += ["--revision", self.revision]
        if self.private:
            args.append("--private")
        if self.create_pr:
            args.append("--create-pr")
        return shlex.join(args)

    def failed(self, why: str) -> str:
        if not self.written:
            return f"push failed: {why}. Nothing was written: fix this and run the command again"
        return (
            f"push failed: {why}. The local folder {self.folder} is complete and intact; "
            f"retry with: {self.retry_command()}"
        )


def _head(api, repo_id, revision) -> str | None:
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return api.model_info(repo_id, revision=revision).sha
    except RevisionNotFoundError:
        return None


class _hub_errors:
    """Turn huggingface_hub / network exceptions into one ShortVError line."""

    def __init__(self, publisher: Publisher):
        self.publisher = publisher

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, (ShortVError, KeyboardInterrupt)):
            return False
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        if isinstance(err, OfflineModeIsEnabled):
            why = "the Hub is in offline mode (HF_HUB_OFFLINE=1); unset it"
        elif isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code == 401:
            why = "the Hub rejected the token (401): check HF_TOKEN or run `hf auth login`"
        elif isinstance(err, HfHubHTTPError) and err.response is not None and err.response.status_code == 403:
            why = "the token may not write to this repo (403): use a write token, or a --repo-id you own"
        elif isinstance(err, HfHubHTTPError):
            status = err.response.status_code if err.response is not None else "?"
            why = f"the Hub answered {status}: {one_line(err, 200)}"
        elif isinstance(err, (httpx2.TransportError, OSError)):
            why = f"could not reach the Hub ({type(err).__name__}: {one_line(err, 200)})"
        else:
            return False
        raise ShortVError(self.publisher.failed(why)) from None
