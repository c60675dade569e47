"""A loopback Hugging Face Hub for tests: a real HTTP server on 127.0.0.1 that speaks enough of the Hub API
for the real ``huggingface_hub`` client to create repos, commit files (``upload_folder``/``create_commit``,
every file inlined as a "regular" git blob, so nothing goes through LFS or Xet) and download them again
(``hf_hub_download``, ``snapshot_download``, ``from_pretrained``).

Repos live in memory: every commit is a full snapshot ``{path: bytes}`` keyed by its sha; branches point at
commits. Every request is recorded in ``HubServer.requests`` (method, path, Authorization header) so tests
can check what the client sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>revision|tree|preupload|commit|branch)/(?P<rest>.+))?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    """An HTTP error answer, with the ``X-Error-Code`` the client maps to its exception classes."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)  # {"sha", "branch", "message"}, oldest first

    def resolve(self, revision: str) -> tuple[str, dict[str, bytes]]:
        sha = self.refs.get(revision, revision)
        if sha not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha, self.commits[sha]

    def commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        payload = json.dumps([branch, message, len(self.commits), sorted(files)]).encode()
        sha = hashlib.sha1(payload + b"".join(files[k] for k in sorted(files))).hexdigest()
        self.commits[sha], self.refs[branch] = dict(files), sha
        self.log.append({"sha": sha, "branch": branch, "message": message})
        return sha


class HubState:
    """What the Hub knows: repos by id, plus a log of the requests it answered."""

    def __init__(self, url: str = ""):
        self.url = url
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    # -- routes --------------------------------------------------------------------------------
    def create_repo(self, body: dict) -> dict:
        repo_id = f"{body.get('organization') or 'tester'}/{body['name']}"
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        repo = self.repos[repo_id] = Repo(private=body.get("visibility") == "private")
        repo.commit("main", {".gitattributes": GITATTRIBUTES}, "initial commit")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def info(self, repo_id: str, revision: str) -> dict:
        repo = self.repo(repo_id)
        sha, files = repo.resolve(revision)
        siblings = [{"rfilename": path, "size": len(data)} for path, data in sorted(files.items())]
        return {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "siblings": siblings}

    def tree(self, repo_id: str, revision: str) -> list[dict]:
        _, files = self.repo(repo_id).resolve(revision)
        return [
            {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha(data)}
            for path, data in sorted(files.items())
        ]

    def commit(self, repo_id: str, revision: str, body: bytes) -> dict:
        repo = self.repo(repo_id)
        _, files = repo.resolve(revision)
        files, message = dict(files), ""
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise HubError(400, f"this test Hub does not support {key!r} commit entries")
        sha = repo.commit(revision, files, message)
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "success": True}

    def create_branch(self, repo_id: str, branch: str, body: dict) -> dict:
        repo = self.repo(repo_id)
        if branch in repo.refs:
            raise HubError(409, f"Reference {branch} already exists")
        repo.refs[branch] = repo.resolve(body.get("startingPoint") or "main")[0]
        return {}


def validate_yaml(body: dict) -> dict:
    """Reject a README whose front matter is not a YAML mapping, as the Hub does."""
    match = re.match(r"^---\r?\n(.*?)\r?\n---", body.get("content", ""), re.S)
    if match and not isinstance(yaml.safe_load(match.group(1)) or {}, dict):
        raise HubError(400, "metadata must be a mapping")
    return {}


class _Handler(BaseHTTPRequestHandler):
    server_version = "LoopbackHub/1"
    state: HubState  # set on the subclass built by HubServer

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def do_GET(self):
        self._answer()

    def do_HEAD(self):
        self._answer()

    def do_POST(self):
        self._answer()

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self) -> None:
        url = urlsplit(self.path)
        body = self._body() if self.command == "POST" else b""
        with self.state.lock:
            self.state.requests.append(
                {"method": self.command, "path": url.path, "authorization": self.headers.get("Authorization")}
            )
            try:
                status, headers, payload = self._route(url.path, parse_qs(url.query), body)
            except HubError as err:
                status, payload = err.status, json.dumps({"error": str(err), **err.extra}).encode()
                headers = {"Content-Type": "application/json", "X-Error-Message": str(err)}
                if err.code:
                    headers["X-Error-Code"] = err.code
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _route(self, path: str, query: dict, body: bytes) -> tuple[int, dict, bytes]:
        state, post = self.state, self.command == "POST"
        if post and path == "/api/validate-yaml":
            return _json(validate_yaml(json.loads(body or b"{}")))
        if post and path == "/api/repos/create":
            self._require_token()
            return _json(state.create_repo(json.loads(body or b"{}")))
        if path == "/api/whoami-v2":
            self._require_token()
            return _json({"name": "tester", "type": "user", "auth": {"type": "access_token"}})
        if match := _API.match(path):
            return _json(self._api(match["repo"], match["op"], match["rest"] or "", body))
        if (match := _RESOLVE.match(path)) and not post:
            return self._resolve(match["repo"], unquote(match["rev"]), unquote(match["path"]))
        raise HubError(404, f"no route for {self.command} {path}")

    def _api(self, repo_id: str, op: str | None, rest: str, body: bytes):
        state = self.state
        revision = unquote(rest.split("/", 1)[0]) if op == "tree" else unquote(rest)
        if self.command == "GET" and op in (None, "revision"):
            return state.info(repo_id, revision or "main")
        if self.command == "GET" and op == "tree":
            return state.tree(repo_id, revision)
        self._require_token()
        state.repo(repo_id)
        if op == "preupload":
            files = json.loads(body)["files"]
            return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if op == "commit":
            return state.commit(repo_id, revision, body)
        if op == "branch":
            return state.create_branch(repo_id, revision, json.loads(body or b"{}"))
        raise HubError(404, f"no route for {self.command} {op}")

    def _resolve(self, repo_id: str, revision: str, path: str) -> tuple[int, dict, bytes]:
        sha, files = self.state.repo(repo_id).resolve(revision)
        if path not in files:
            raise HubError(404, f"{path} does not exist on {revision}", "EntryNotFound")
        data = files[path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(data)}"', "Content-Type": "application/octet-stream"}
        return 200, headers, data

    def _require_token(self) -> None:
        if not (self.headers.get("Authorization") or "").startswith("Bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")


def _json(payload) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


class HubServer:
    """``with HubServer() as hub: ... hub.url ...``: the Hub on a free loopback port, in a daemon thread."""

    def __init__(self):
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = self.state.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def requests(self) -> list[dict]:
        return self.state.requests

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return self.state.repo(repo_id).resolve(revision)[1]
