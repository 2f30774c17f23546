"""Push an export folder to the Hugging Face Hub in one commit.

The token comes from the argument, else ``HF_TOKEN``, else the saved login (``hf auth login``). It is only ever
handed to :class:`huggingface_hub.HfApi`: never printed, logged, put in an error message or written to a file.
Every failure is one :class:`HubError` with one sentence; the local export folder is never changed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lens_tune.errors import LensTuneError

__all__ = ["HubError", "push_to_hub", "resolve_token"]

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login`"


class HubError(LensTuneError):
    """Pushing to the Hugging Face Hub failed (no token, refused, unreachable)."""


def resolve_token(token: str | None = None) -> str | None:
    """The token to use: `token`, else HF_TOKEN, else the saved login; None when there is none."""
    if token:
        return token
    env = os.environ.get("HF_TOKEN", "").strip()
    if env:
        return env
    try:
        from huggingface_hub import get_token

        return get_token() or None
    except Exception:  # a broken token file or OIDC setup counts as "no token"
        return None


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _server_says(err: BaseException) -> str:
    """The server's own short error text (X-Error-Message or JSON `error`), without anything from the request."""
    response = getattr(err, "response", None)
    if response is None:
        return ""
    text = ""
    try:
        text = response.headers.get("X-Error-Message", "") or ""
        if not text:
            body = response.json()
            if isinstance(body, dict):
                text = str(body.get("error", "") or "")
    except Exception:
        text = ""
    text = " ".join(text.split())[:200].rstrip(".")
    return text


def _http_error(err: BaseException, repo_id: str, endpoint: str, action: str) -> HubError:
    status = _status(err)
    if status == 401:
        return HubError(f"the Hugging Face Hub at {endpoint} rejected the token (401): it is invalid or expired; "
                        "set a valid HF_TOKEN or run `hf auth login` again")
    if status == 403:
        return HubError(f"no write access to {repo_id} (403): the token's user cannot write there; use a token with "
                        "write permission for that user or organisation, or push to your own namespace")
    if status == 409:
        said = _server_says(err)
        detail = f" ({said})" if said else ""
        return HubError(f"the name {repo_id} conflicts with an existing repository on {endpoint} (409){detail}; "
                        "choose another repo id")
    if status == 404:
        return HubError(f"{repo_id} was not found on {endpoint} (404) while trying to {action}; check the repo id and "
                        "the revision")
    said = _server_says(err)
    detail = f": {said}" if said else ""
    return HubError(f"the Hugging Face Hub at {endpoint} refused to {action} {repo_id} (HTTP {status}){detail}")


def push_to_hub(
    export_dir: Path | str,
    repo_id: str,
    *,
    private: bool,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Create `repo_id` (a model repo) if missing and upload the whole of `export_dir` in one commit.

    Returns the commit URL. Raises :class:`HubError` for every failure; `export_dir` is left as it was.
    """
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise HubError(f"nothing to push: the export folder {export_dir.name} does not exist")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise HubError(f"'{repo_id}' is not a Hub repo id; use USER/REPO")
    token = resolve_token(token)
    if not token:
        raise HubError(NO_TOKEN)

    api = HfApi(endpoint=endpoint, token=token)
    shown = (api.endpoint or DEFAULT_ENDPOINT).rstrip("/")
    action = "create"
    error: HubError | None = None
    try:
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=False)
            log.info("created %s repository %s on %s", "private" if private else "public", repo_id, shown)
        except HfHubHTTPError as err:
            # Like exist_ok=True, but a 409 only passes when the name really is an existing model repo we can see:
            # any other conflict (another type, another owner, an operation in progress) is reported.
            if _status(err) not in (401, 402, 403, 409):
                raise
            try:
                api.repo_info(repo_id, repo_type="model")
            except HfHubHTTPError:
                raise err from None
            log.info("repository %s already exists on %s", repo_id, shown)
        action = "upload to"
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(export_dir),
            revision=revision,
            commit_message=f"Upload {export_dir.name} with lens-tune",
        )
    except OfflineModeIsEnabled:
        error = HubError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it (or set HF_HUB_OFFLINE=0) to push")
    except HfHubHTTPError as err:
        error = _http_error(err, repo_id, shown, action)
    except (httpx2.TransportError, ConnectionError, OSError) as err:
        if isinstance(err, (httpx2.TimeoutException, TimeoutError)):
            error = HubError(f"could not reach the Hugging Face Hub at {shown}: the connection timed out")
        else:
            error = HubError(f"could not reach the Hugging Face Hub at {shown}")
    if error is not None:
        raise error  # outside the except blocks: no chained exception that could carry request details
    url = str(getattr(info, "commit_url", None) or info)
    log.info("pushed %s to %s in one commit: %s", export_dir.name, repo_id, url)
    return url
