"""A tiny loopback stand-in for the Hugging Face Hub: just what `create_repo` + `upload_folder` use.

Endpoints (huggingface_hub 2.4, regular uploads, no LFS):
  POST /api/repos/create                          -> {"url": ...}      (409 when the repo already exists)
  GET  /api/models/{user}/{repo}[/revision/{rev}] -> repo info          (create_repo's fallback after 401/403/409)
  POST /api/validate-yaml                         -> {"errors": [], "warnings": []}
  POST /api/models/{user}/{repo}/preupload/{rev}  -> every file "regular"
  POST /api/models/{user}/{repo}/commit/{rev}     -> NDJSON body; records the decoded files
Anything else answers 404 and is recorded in `unknown`. `fail = {"create": 401, "commit": 403, ...}` makes that
endpoint answer with the status instead (and the repo-info fallback answers the same status).
The server binds 127.0.0.1 on a free port and runs in a daemon thread; use it as a context manager.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

ERRORS = {
    401: "Invalid credentials in Authorization header",
    403: "You don't have the rights to create a model under the namespace",
    409: "You already created this dataset repo",
}


class FakeHub:
    def __init__(self, fail: dict[str, int] | None = None, existing: set[str] | None = None):
        self.fail = dict(fail or {})
        self.repos: dict[str, dict] = {r: {"private": False} for r in (existing or ())}
        self.created: list[dict] = []  # create payloads
        self.commits: list[dict] = []  # {"repo", "revision", "header", "files": {path: bytes}}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.authorizations: list[str | None] = []
        self.unknown: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def files(self) -> dict[str, bytes]:
        """Every file of every commit, later commits winning."""
        out: dict[str, bytes] = {}
        for commit in self.commits:
            out.update(commit["files"])
        return out

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean (and never echo headers)
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------
    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: dict | None = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        if status >= 400 and body and "error" in body:
            h.send_header("X-Error-Message", body["error"])
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _error(self, h, status: int) -> None:
        self._reply(h, status, {"error": ERRORS.get(status, f"error {status}")})

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        path = urlsplit(h.path).path
        with self.lock:
            self.requests.append((method, path))
            self.authorizations.append(h.headers.get("Authorization"))
        parts = [unquote(p) for p in path.strip("/").split("/")]

        if method == "POST" and path == "/api/repos/create":
            if "create" in self.fail:
                return self._error(h, self.fail["create"])
            payload = json.loads(body or b"{}")
            repo = f"{payload.get('organization')}/{payload['name']}"
            self.created.append(payload)
            if repo in self.repos:
                return self._reply(h, 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo}"})
            self.repos[repo] = {"private": payload.get("visibility") == "private" or bool(payload.get("private"))}
            return self._reply(h, 200, {"url": f"{self.endpoint}/{repo}", "name": repo})

        if method == "POST" and path == "/api/validate-yaml":
            return self._reply(h, 200, {"errors": [], "warnings": []})

        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo = f"{parts[2]}/{parts[3]}"
            rest = parts[4:]
            if method == "GET" and (not rest or rest[0] == "revision"):
                status = self.fail.get("create") or self.fail.get("info")
                if status:
                    return self._error(h, status)
                if repo not in self.repos:
                    return self._reply(h, 404, {"error": "Repository not found"})
                return self._reply(h, 200, {"id": repo, "modelId": repo, "private": self.repos[repo]["private"],
                                            "sha": "0" * 40, "siblings": []})
            if method == "POST" and len(rest) >= 2 and rest[0] == "preupload":
                if "preupload" in self.fail:
                    return self._error(h, self.fail["preupload"])
                if repo not in self.repos:
                    return self._reply(h, 404, {"error": "Repository not found"})
                files = json.loads(body or b"{}").get("files", [])
                return self._reply(h, 200, {"files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
            if method == "POST" and len(rest) >= 2 and rest[0] == "commit":
                if "commit" in self.fail:
                    return self._error(h, self.fail["commit"])
                if repo not in self.repos:
                    return self._reply(h, 404, {"error": "Repository not found"})
                return self._commit(h, repo, "/".join(rest[1:]), body)

        with self.lock:
            self.unknown.append((method, path))
        return self._reply(h, 404, {"error": "not found"})

    def _commit(self, h, repo: str, revision: str, body: bytes) -> None:
        header, files = None, {}
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item.get("key") == "header":
                header = item.get("value")
            elif item.get("key") == "file":
                value = item["value"]
                if value.get("encoding", "base64") != "base64":
                    content = value["content"].encode()
                else:
                    content = base64.b64decode(value["content"])
                files[value["path"]] = content
            else:
                return self._reply(h, 400, {"error": f"unexpected commit line {item.get('key')!r}"})
        oid = hashlib.sha1(json.dumps(sorted((p, hashlib.sha256(c).hexdigest()) for p, c in files.items())).encode()
                           + str(len(self.commits)).encode()).hexdigest()
        with self.lock:
            self.commits.append({"repo": repo, "revision": revision, "header": header, "files": files})
        return self._reply(h, 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid})
