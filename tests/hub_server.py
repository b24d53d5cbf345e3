"""A tiny Hugging Face Hub-compatible HTTP server for offline tests.

It implements just enough of the Hub HTTP API for the real ``huggingface_hub``
client (2.x) to create a repo, upload a folder, look up a revision, list the
tree and download files through ``hf_hub_download``/``snapshot_download``:

* ``POST /api/repos/create``                     -> records ``sdk`` (Spaces), ``hardware``, ``variables``
* ``POST /api/spaces/{repo}/hardware``            -> records the requested hardware flavor
* ``POST /api/spaces/{repo}/variables``           -> records a Space variable
* ``POST /api/validate-yaml``                    -> README front matter must be a YAML mapping
* ``POST /api/{type}s/{repo}/preupload/{rev}``   -> every file is "regular" (no LFS/Xet)
* ``POST /api/{type}s/{repo}/commit/{rev}``      -> ndjson commit (file / deletedFile / deletedFolder)
* ``GET  /api/{type}s/{repo}[/revision/{rev}]``  -> repo info with ``sha`` and ``siblings``
* ``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]`` -> tree listing (``recursive`` honoured)
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``        -> file bytes with ``X-Repo-Commit``, ``ETag``, ``Content-Length``

Because the preupload answer is always ``"regular"``, the client sends file
contents inline (base64) in the commit, so neither git-LFS nor Xet storage is
needed. Errors carry the ``X-Error-Code`` header the client maps to
``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError``.

Every request is appended to :attr:`HubServer.requests` so a test can assert
which files were actually fetched.

Usage::

    with HubServer() as server:
        os.environ["HF_ENDPOINT"] = server.url
        ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

_TYPES = "models|datasets|spaces"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(r"^/api/spaces/(?P<repo>[^/]+/[^/]+)/hardware$"), "space_hardware"),
    ("POST", re.compile(r"^/api/spaces/(?P<repo>[^/]+/[^/]+)/variables$"), "space_variable"),
    ("POST", re.compile(rf"^/api/(?P<type>{_TYPES})/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/(?P<type>{_TYPES})/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/(?P<type>{_TYPES})/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/(?P<type>{_TYPES})/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$"), "info"),
    ("GET", re.compile(r"^/(?:(?P<prefix>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(r"^/(?:(?P<prefix>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def git_blob_sha(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Commit:
    oid: str
    files: dict[str, bytes]
    message: str


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: list[_Commit] = field(default_factory=list)
    sdk: Optional[str] = None  # Spaces: the SDK asked for at creation
    hardware: list[str] = field(default_factory=list)  # Spaces: every hardware flavor requested, in order
    variables: dict[str, str] = field(default_factory=dict)  # Spaces: variables as set

    @property
    def head(self) -> _Commit:
        return self.commits[-1]

    def resolve(self, revision: str) -> Optional[_Commit]:
        revision = unquote(revision)
        if revision == "main":
            return self.head
        for commit in self.commits:
            if commit.oid == revision:
                return commit
        return None


class HubServer:
    """In-memory Hub on loopback, run in a background thread; use as a context manager."""

    def __init__(self, token: Optional[str] = None) -> None:
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.token = token
        self._lock = threading.RLock()
        self._counter = 0
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def downloaded(self, repo_id: str) -> list[str]:
        """Paths of ``repo_id`` fetched with GET ``resolve`` (the actual downloads)."""
        prefix = f"/{repo_id}/resolve/"
        out = []
        for method, path in self.requests:
            if method == "GET" and path.startswith(prefix):
                out.append(unquote(path[len(prefix):].split("/", 1)[1]))
        return out

    def _new_oid(self, seed: str) -> str:
        with self._lock:
            self._counter += 1
            count = self._counter
        return hashlib.sha1(f"{seed}:{count}:{time.time_ns()}".encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.hub.requests.append((method, parts.path))
        for route_method, pattern, name in _ROUTES:
            if route_method != method:
                continue
            match = pattern.match(parts.path)
            if match:
                try:
                    getattr(self, f"_{name}")(**{k: v for k, v in match.groupdict().items()})
                except Exception as error:  # surface server bugs as 500 with a message
                    self._json(500, {"error": f"{type(error).__name__}: {error}"})
                return
        self._json(404, {"error": f"no route for {method} {parts.path}"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, payload, headers: Optional[dict[str, str]] = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, headers: Optional[dict[str, str]] = None) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})})

    def _authorized(self) -> bool:
        if self.hub.token is None:
            return True
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False) -> Optional[_Repo]:
        repo = self.hub.repos.get((repo_type, repo_id))
        if write and not self._authorized():
            self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            return None
        return repo

    def _commit_or_error(self, repo: _Repo, rev: str) -> Optional[_Commit]:
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
        return commit

    # ------------------------------------------------------------------ routes
    def _create_repo(self) -> None:
        if not self._authorized():
            self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            return
        payload = json.loads(self._body() or b"{}")
        namespace = payload.get("organization") or "user"
        repo_id = f"{namespace}/{payload['name']}"
        repo_type = (payload.get("type") or "model") + "s"
        key = (repo_type, repo_id)
        prefix = "" if repo_type == "models" else f"{repo_type}/"
        url = f"{self.hub.url}/{prefix}{repo_id}"
        with self.hub._lock:
            if key in self.hub.repos:
                self._json(409, {"error": "You already created this model repo", "url": url})
                return
            repo = _Repo(repo_id, repo_type, private=payload.get("visibility") == "private" or bool(payload.get("private")),
                         sdk=payload.get("sdk"))
            if payload.get("hardware"):
                repo.hardware.append(payload["hardware"])
            repo.variables.update({v["key"]: v["value"] for v in payload.get("variables") or []})
            initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            repo.commits.append(_Commit(self.hub._new_oid(repo_id), initial, "initial commit"))
            self.hub.repos[key] = repo
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        """Parse a README's YAML front matter like the Hub does before accepting a model card."""
        import yaml

        content = json.loads(self._body() or b"{}").get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        if match is None:
            self._json(200, {"errors": [], "warnings": [{"message": "Empty or missing yaml metadata in repo card"}]})
            return
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            self._json(400, {"errors": [{"message": f"YAML parse error: {error}"}], "warnings": []})
            return
        if not isinstance(metadata, dict):
            self._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []})
            return
        self._json(200, {"errors": [], "warnings": []})

    def _space_hardware(self, repo: str) -> None:
        found = self._repo("spaces", repo, write=True)
        if found is None:
            return
        flavor = json.loads(self._body() or b"{}")["flavor"]
        found.hardware.append(flavor)
        self._json(200, {"stage": "BUILDING", "hardware": {"current": None, "requested": flavor}})

    def _space_variable(self, repo: str) -> None:
        found = self._repo("spaces", repo, write=True)
        if found is None:
            return
        payload = json.loads(self._body() or b"{}")
        found.variables[payload["key"]] = payload["value"]
        self._json(200, {k: {"value": v, "updatedAt": None} for k, v in found.variables.items()})

    def _preupload(self, type: str, repo: str, rev: str) -> None:
        found = self._repo(type, repo, write=True)
        if found is None:
            return
        payload = json.loads(self._body())
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in payload.get("files", [])
        ]
        self._json(200, {"files": files, "commitOid": found.head.oid})

    def _commit(self, type: str, repo: str, rev: str) -> None:
        found = self._repo(type, repo, write=True)
        if found is None:
            return
        body = self._body()
        with self.hub._lock:
            parent = found.resolve(rev)
            if parent is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
                return
            files = dict(parent.files)
            message = ""
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary", "")
                    expected = value.get("parentCommit")
                    if expected and not parent.oid.startswith(expected):
                        self._json(412, {"error": "A commit has happened since. Please refresh and try again."})
                        return
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        self._json(400, {"error": f"unsupported encoding {value.get('encoding')}"})
                        return
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(folder)}
                else:  # lfsFile etc.: this server never asks for LFS uploads
                    self._json(400, {"error": f"unsupported commit operation {key!r} (this test Hub has no LFS)"})
                    return
            commit = _Commit(self.hub._new_oid(repo), files, message)
            found.commits.append(commit)
        prefix = "" if type == "models" else f"{type}/"
        self._json(200, {"commitUrl": f"{self.hub.url}/{prefix}{repo}/commit/{commit.oid}", "commitOid": commit.oid,
                         "success": True})

    def _info(self, type: str, repo: str, rev: Optional[str] = None) -> None:
        found = self._repo(type, repo)
        if found is None:
            return
        commit = self._commit_or_error(found, rev or "main")
        if commit is None:
            return
        siblings = []
        for path, data in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if self.query.get("blobs") in ("True", "true", "1"):
                sibling.update(size=len(data), blobId=git_blob_sha(data))
            siblings.append(sibling)
        self._json(200, {"id": repo, "modelId": repo, "sha": commit.oid, "private": found.private,
                         "siblings": siblings, "tags": [], "disabled": False, "gated": False})

    def _tree(self, type: str, repo: str, rev: str, path: Optional[str] = None) -> None:
        found = self._repo(type, repo)
        if found is None:
            return
        commit = self._commit_or_error(found, rev)
        if commit is None:
            return
        base = unquote(path).strip("/") if path else ""
        recursive = self.query.get("recursive", "False").lower() in ("true", "1")
        prefix = base + "/" if base else ""
        if base and not any(p.startswith(prefix) for p in commit.files):
            self._error(404, "EntryNotFound", f"{base} does not exist on {rev}",
                        {"X-Repo-Commit": commit.oid})
            return
        entries: dict[str, dict] = {}
        for file_path, data in sorted(commit.files.items()):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            # folders on the way to this file
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
            if recursive or len(parts) == 1:
                entries[file_path] = {"type": "file", "path": file_path, "size": len(data), "oid": git_blob_sha(data)}
        self._json(200, list(entries.values()))

    def _resolve(self, repo: str, rev: str, path: str, prefix: Optional[str] = None) -> None:
        found = self._repo(prefix or "models", repo)
        if found is None:
            return
        commit = self._commit_or_error(found, rev)
        if commit is None:
            return
        file_path = unquote(path)
        data = commit.files.get(file_path)
        if data is None:
            self._error(404, "EntryNotFound", f"{file_path} does not exist on {unquote(rev)}",
                        {"X-Repo-Commit": commit.oid})
            return
        status, start = 200, 0
        range_header = self.headers.get("Range")
        if range_header and self.command == "GET":
            match = re.match(r"bytes=(\d+)-", range_header)
            if match:
                start = min(int(match.group(1)), len(data))
                status = 206
        chunk = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(chunk)))
        self.send_header("ETag", f'"{git_blob_sha(data)}"')
        self.send_header("X-Repo-Commit", commit.oid)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(chunk)


if __name__ == "__main__":  # manual use: python tests/hub_server.py
    with HubServer() as hub:
        print(f"Hub-compatible test server at {hub.url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
