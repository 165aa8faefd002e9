"""A local stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1: what huggingface_hub 2.x calls to create a
repo, upload a folder (preupload, LFS batch/upload/verify, NDJSON commit, branches, pull requests) and download a
snapshot (revision info, tree, resolve). Repos live in memory as commits of {path: bytes}.

Tokens: ``Hub.tokens`` maps token -> user; writes need a valid token. ``Hub.fail`` = (path fragment, status)
makes matching requests fail once per call with that status.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".onnx", ".onnx_data", ".data", ".png", ".jpg", ".bin")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    commits: dict = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict = field(default_factory=dict)  # branch or refs/pr/N -> sha
    prs: int = 0

    def files(self, rev: str) -> dict | None:
        sha = self.refs.get(rev, rev if rev in self.commits else None)
        return None if sha is None else self.commits[sha]


class Hub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.tokens = {"hf_good": "me", "hf_readonly": "reader"}
        self.read_only = {"hf_readonly"}
        self.fail: tuple[str, int] | None = None
        self.log: list[tuple[str, str]] = []  # (method, path)
        self.uploaded_bytes = 0
        self.commits_made = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> str:
        repo = self.repos.setdefault(repo_id, Repo(private=private))
        return self._commit(repo, "main", files)

    def _commit(self, repo: Repo, branch: str, files: dict[str, bytes], parent: str | None = None) -> str:
        base = dict(repo.commits.get(parent or repo.refs.get(branch, ""), {}))
        base.update(files)
        sha = hashlib.sha1(json.dumps(sorted((k, git_sha1(v)) for k, v in base.items())).encode()).hexdigest()
        sha = hashlib.sha1((sha + str(len(repo.commits))).encode()).hexdigest()
        repo.commits[sha] = base
        repo.refs[branch] = sha
        return sha


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        # -- plumbing ----------------------------------------------------------------------------------
        def _body(self) -> bytes:
            return self.body

        def _send(self, status=200, payload=None, headers=None, raw: bytes | None = None, head=False):
            data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if not head and self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status, message, code=None):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _user(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else None
            return hub.tokens.get(token) if token else None

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth[7:] if auth.startswith("Bearer ") else None

        def _can_write(self, repo_id: str) -> bool:
            user = self._user()
            if user is None:
                self._error(401, "Invalid credentials in Authorization header")
                return False
            if self._token() in hub.read_only or repo_id.split("/")[0] != user:
                self._error(403, f"You don't have the rights to write to {repo_id}")
                return False
            return True

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and self._user() != repo_id.split("/")[0]):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            return repo

        def _failing(self) -> bool:
            if hub.fail and hub.fail[0] in self.path:
                self._error(hub.fail[1], f"injected failure {hub.fail[1]}")
                return True
            return False

        def _route(self, method: str):
            url = urlparse(self.path)
            path = unquote(url.path)
            query = parse_qs(url.query)
            length = int(self.headers.get("Content-Length") or 0)
            self.body = self.rfile.read(length) if length else b""  # always consumed: keep-alive stays in step
            hub.log.append((method, path))
            if self._failing():
                return
            for pattern, handler in ROUTES:
                if pattern[0] == method and (m := re.fullmatch(pattern[1], path)):
                    return handler(self, query, *m.groups())
            self._error(404, f"no stand-in route for {method} {path}")

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

        # -- API -----------------------------------------------------------------------------------------
        def whoami(self, query):
            user = self._user()
            if user is None:
                return self._error(401, "Invalid credentials in Authorization header")
            role = "read" if self._token() in hub.read_only else "write"
            self._send(200, {"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": role}}})

        def create_repo(self, query):
            body = json.loads(self._body() or b"{}")
            repo_id = f"{body.get('organization') or self._user()}/{body['name']}"
            if not self._can_write(repo_id):
                return
            if repo_id in hub.repos:  # the Hub answers 409 with the repo's url
                message = "You already created this model repo"
                return self._send(409, {"error": message, "url": f"{hub.url}/{repo_id}"}, {"X-Error-Message": message})
            hub.repos[repo_id] = Repo(private=body.get("visibility") == "private" or bool(body.get("private")))
            hub.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def create_branch(self, query, repo_id, branch):
            if not self._can_write(repo_id) or (repo := self._repo(repo_id)) is None:
                return
            if branch in repo.refs:
                return self._error(409, "Branch already exists")
            repo.refs[branch] = repo.refs["main"]
            self._send(200, {})

        def validate_yaml(self, query):
            self._body()
            self._send(200, {"errors": [], "warnings": []})

        def preupload(self, query, repo_id, revision):
            if (repo := self._repo(repo_id)) is None:
                return
            files = repo.files(revision) or {}
            out = []
            for f in json.loads(self._body())["files"]:
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10_000_000
                existing = files.get(f["path"])
                oid = None
                if existing is not None:
                    oid = hashlib.sha256(existing).hexdigest() if lfs else git_sha1(existing)
                out.append(
                    {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
                )
            self._send(200, {"files": out})

        def lfs_batch(self, query, repo_id):
            if not self._can_write(repo_id):
                return
            body = json.loads(self._body())
            objects = []
            for obj in body["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/_lfs/{obj['oid']}"},
                        "verify": {"href": f"{hub.url}/_lfs_verify"},
                    }
                objects.append(entry)
            data = json.dumps({"transfer": "basic", "objects": objects}).encode()
            self._send(200, raw=data, headers={"Content-Type": "application/vnd.git-lfs+json"})

        def lfs_put(self, query, oid):
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, "sha256 mismatch")
            hub.lfs[oid] = data
            hub.uploaded_bytes += len(data)
            self._send(200, {})

        def lfs_verify(self, query):
            body = json.loads(self._body())
            ok = body["oid"] in hub.lfs and len(hub.lfs[body["oid"]]) == body["size"]
            self._send(200 if ok else 404, {})

        def commit(self, query, repo_id, revision):
            if not self._can_write(repo_id) or (repo := self._repo(repo_id)) is None:
                return
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            files, deleted = {}, []
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    data = base64.b64decode(value["content"])
                    hub.uploaded_bytes += len(data)
                    files[value["path"]] = data
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(422, f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif item["key"] == "deletedFile":
                    deleted.append(value["path"])
            if revision not in repo.refs:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            pr_url = None
            branch = revision
            if query.get("create_pr"):
                repo.prs += 1
                branch = f"refs/pr/{repo.prs}"
                repo.refs[branch] = repo.refs[revision]
                pr_url = f"{hub.url}/{repo_id}/discussions/{repo.prs}"
            sha = hub._commit(repo, branch, files)
            for path in deleted:
                repo.commits[sha].pop(path, None)
            hub.commits_made += 1
            self._send(
                200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pr_url}
            )

        def model_info(self, query, repo_id, revision="main"):
            if (repo := self._repo(repo_id)) is None:
                return
            files = repo.files(revision)
            if files is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            sha = repo.refs.get(revision, revision)
            self._send(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": repo.private,
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                },
            )

        def tree(self, query, repo_id, revision, sub=None):
            if (repo := self._repo(repo_id)) is None:
                return
            files = repo.files(revision)
            if files is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            entries = []
            prefix = f"{sub.strip('/')}/" if sub else ""
            chosen = {p: d for p, d in files.items() if p.startswith(prefix)}
            if prefix and not chosen:
                return self._error(404, f"{sub} does not exist on {revision}", "EntryNotFound")
            for path, data in sorted(chosen.items()):
                entry = {"type": "file", "oid": git_sha1(data), "size": len(data), "path": path}
                if path.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
                entries.append(entry)
            self._send(200, entries)

        def resolve(self, query, repo_id, revision, path, head=False):
            if (repo := self._repo(repo_id)) is None:
                return
            files = repo.files(revision)
            if files is None:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if path not in files:
                return self._error(404, "Entry not found", "EntryNotFound")
            data = files[path]
            sha = repo.refs.get(revision, revision)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{git_sha1(data)}"'}
            if path.endswith(LFS_SUFFIXES):
                headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
                headers["X-Linked-Size"] = str(len(data))
            self._send(200, raw=data, headers=headers, head=head)

        def resolve_head(self, query, repo_id, revision, path):
            self.resolve(query, repo_id, revision, path, head=True)

    repo = r"([\w.-]+/[\w.-]+)"
    ROUTES = [
        (("GET", r"/api/whoami-v2"), Handler.whoami),
        (("POST", r"/api/repos/create"), Handler.create_repo),
        (("POST", r"/api/validate-yaml"), Handler.validate_yaml),
        (("POST", rf"/api/models/{repo}/branch/(.+)"), Handler.create_branch),
        (("POST", rf"/api/models/{repo}/preupload/(.+)"), Handler.preupload),
        (("POST", rf"/api/models/{repo}/commit/(.+)"), Handler.commit),
        (("POST", rf"/{repo}\.git/info/lfs/objects/batch"), Handler.lfs_batch),
        (("PUT", r"/_lfs/([0-9a-f]+)"), Handler.lfs_put),
        (("POST", r"/_lfs_verify"), Handler.lfs_verify),
        (("GET", rf"/api/models/{repo}/revision/(.+)"), Handler.model_info),
        (("GET", rf"/api/models/{repo}/tree/([^/]+)(?:/(.*))?"), Handler.tree),
        (("GET", rf"/api/models/{repo}"), Handler.model_info),
        (("GET", rf"/{repo}/resolve/([^/]+)/(.+)"), Handler.resolve),
        (("HEAD", rf"/{repo}/resolve/([^/]+)/(.+)"), Handler.resolve_head),
    ]
    return Handler
