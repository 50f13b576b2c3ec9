"""A local stand-in for the Hugging Face Hub, enough for huggingface_hub's model_info and downloads.

It answers the requests `llmservice-fetch` makes through huggingface_hub when HF_ENDPOINT points
here: `GET /api/models/<repo>[/revision/<rev>]` (with `blobs=true`: sizes, git blob ids, LFS
sha256) and `HEAD`/`GET /<repo>/resolve/<rev>/<file>` with byte ranges and the headers
huggingface_hub reads (X-Repo-Commit, ETag, X-Linked-Size, X-Linked-Etag, X-Error-Code). Errors
are shaped as the Hub shapes them: 401 for a private or gated repo without a token, 404 with
`X-Error-Code: RepoNotFound` / `RevisionNotFound`.

For tests of what goes wrong it can serve a file whose bytes differ from its metadata
(`corrupt`), and stop sending a file part-way until told to go on (`hold`). Standard library only,
so benchmarks and dev tools can use it too: `with FakeHub() as hub: hub.add_repo(...)`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self
from urllib.parse import unquote, urlsplit

LFS_THRESHOLD = 1024  # files at least this large are stored as LFS objects, like weights on the Hub
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class _Repo:
    files: dict[str, bytes]
    commit: str
    branches: dict[str, str]
    token: str | None = None  # private: only this bearer token reads it
    gated: bool = False
    served: dict[str, bytes] = field(default_factory=dict)  # what is sent instead, where it differs
    digests: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (sha256, git blob id), once

    def __post_init__(self) -> None:
        self.digests = {name: (hashlib.sha256(data).hexdigest(), git_blob_id(data)) for name, data in self.files.items()}


@dataclass
class _Hold:
    after: int
    release: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


def git_blob_id(content: bytes) -> str:
    hasher = hashlib.sha1(b"blob %d\0" % len(content), usedforsecurity=False)
    hasher.update(content)
    return hasher.hexdigest()


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 serving the repositories added to it."""

    def __init__(self) -> None:
        self._repos: dict[str, _Repo] = {}
        self._holds: dict[tuple[str, str], _Hold] = {}
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self.bytes_sent = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        for hold in list(self._holds.values()):
            hold.release.set()
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo: str, files: dict[str, bytes], *, branch: str = "main", token: str | None = None, gated: bool = False) -> str:
        """Publish `files` as one commit of `repo` (branch `branch`); returns the commit hash."""
        digest = hashlib.sha1(usedforsecurity=False)
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        commit = digest.hexdigest()
        with self._lock:
            existing = self._repos.get(repo)
            branches = dict(existing.branches) if existing else {}
            branches[branch] = commit
            self._repos[repo] = _Repo(dict(files), commit, branches, token, gated)
        return commit

    def corrupt(self, repo: str, name: str) -> None:
        """Serve `name` with one byte flipped: same size, wrong content."""
        with self._lock:
            entry = self._repos[repo]
            data = bytearray(entry.files[name])
            data[len(data) // 2] ^= 0xFF
            entry.served[name] = bytes(data)

    def hold(self, repo: str, name: str, after: int) -> _Hold:
        """Once: send the first `after` bytes of `name`, wait for `release` (set by the test), hang up."""
        hold = _Hold(after)
        self._holds[(repo, name)] = hold
        return hold

    def ranges(self, name: str) -> list[str | None]:
        """The Range headers of the GETs for a file (None: the whole file)."""
        return [r.range for r in self.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + name)]

    # --- request handling (server threads) ---

    def _lookup(self, repo: str, revision: str) -> tuple[_Repo | None, str | None]:
        entry = self._repos.get(repo)
        if entry is None:
            return None, None
        if revision == entry.commit:
            return entry, entry.commit
        return entry, entry.branches.get(revision)

    def _deny(self, entry: _Repo | None, authorization: str | None) -> tuple[int, str, str] | None:
        """(status, X-Error-Code, message) when the caller may not read the repo."""
        if entry is None:
            return 404, "RepoNotFound", "Repository not found"
        token = (authorization or "").removeprefix("Bearer ").strip() or None
        if entry.token is not None and token != entry.token:
            if token is None:
                return 401, "GatedRepo" if entry.gated else "RepoNotFound", "Access to this model is restricted."
            return 403, "GatedRepo" if entry.gated else "", "You do not have access to this model."
        return None


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            return  # quiet: tests read hub.requests instead

        def do_GET(self) -> None:
            self._route(head=False)

        def do_HEAD(self) -> None:
            self._route(head=True)

        def _route(self, *, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            if api:
                self._model_info(api.group(1), api.group(2) or "main", head=head)
                return
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if resolve:
                self._resolve(resolve.group(1), resolve.group(2), resolve.group(3), head=head)
                return
            self._error(404, "", "Not found", head=head)

        def _error(self, status: int, code: str, message: str, *, head: bool, commit: str | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _found(self, repo: str, revision: str, *, head: bool) -> tuple[_Repo, str] | None:
            """The repository and the commit a revision names, or None once the error is sent."""
            entry, commit = hub._lookup(repo, revision)
            denied = hub._deny(entry, self.headers.get("Authorization"))
            if denied is not None:
                self._error(*denied, head=head)
                return None
            assert entry is not None
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
                return None
            return entry, commit

        def _model_info(self, repo: str, revision: str, *, head: bool) -> None:
            if (found := self._found(repo, revision, head=head)) is None:
                return
            entry, commit = found
            siblings = []
            for name in sorted(entry.files):
                content = entry.files[name]
                sha256, blob_id = entry.digests[name]
                sibling: dict[str, object] = {"rfilename": name, "size": len(content), "blobId": blob_id}
                if len(content) >= LFS_THRESHOLD:
                    sibling["lfs"] = {"size": len(content), "sha256": sha256, "pointerSize": 134}
                siblings.append(sibling)
            body = json.dumps(
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": commit,
                    "private": entry.token is not None,
                    "gated": "auto" if entry.gated else False,
                    "siblings": siblings,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _resolve(self, repo: str, revision: str, name: str, *, head: bool) -> None:
            if (found := self._found(repo, revision, head=head)) is None:
                return
            entry, commit = found
            if name not in entry.files:
                self._error(404, "EntryNotFound", f"{name} does not exist", head=head, commit=commit)
                return
            listed = entry.files[name]
            content = entry.served.get(name, listed)
            start, end = 0, len(content) - 1
            match = _RANGE.match(self.headers.get("Range") or "")
            if match:
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else end
                if start >= len(content):
                    self._error(416, "", "Range Not Satisfiable", head=head, commit=commit)
                    return
            lfs = len(listed) >= LFS_THRESHOLD
            sha256, blob_id = entry.digests[name]
            etag = sha256 if lfs else blob_id
            self.send_response(206 if match else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            if lfs:
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(listed)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            if match:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(content)}")
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if head:
                return
            self._send(repo, name, content, start, end + 1)

        def _send(self, repo: str, name: str, content: bytes, start: int, stop: int) -> None:
            hold = hub._holds.get((repo, name))
            if hold is not None and start < hold.after < stop:
                del hub._holds[(repo, name)]  # once: the next request for the file is served whole
                self.wfile.write(content[start : hold.after])
                self.wfile.flush()
                hub.bytes_sent += hold.after - start
                hold.reached.set()
                hold.release.wait(30)
                self.close_connection = True
                return
            self.wfile.write(content[start:stop])
            hub.bytes_sent += stop - start

    return Handler
