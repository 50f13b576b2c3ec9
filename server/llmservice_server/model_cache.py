"""The model cache's layout and the fetch's result, shared by `llmservice-fetch`, the loader and /startupz.

Pure apart from reading and writing the two small JSON files it names: no HTTP, no torch. One
repository revision lives in one directory; a download goes to a hidden sibling first and is
renamed into place with its completion marker inside, so a directory that exists is complete and
a revision change lands beside the old copy instead of over it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

MARKER = ".llmservice-fetch.json"
DEFAULT_REVISION = "main"

# How a failed fetch is classified: the operator shows the reason, a person acts on the message.
Reason = Literal["Fetched", "Unauthorized", "Gated", "RepoNotFound", "RevisionNotFound", "DiskFull", "Corrupt", "Unreachable", "Failed"]
# Reasons that a retry cannot fix: the Job fails at once (exit code PERMANENT_EXIT) instead of backing off.
PERMANENT: frozenset[str] = frozenset({"Unauthorized", "Gated", "RepoNotFound", "RevisionNotFound", "DiskFull"})
PERMANENT_EXIT = 2
RETRYABLE_EXIT = 1


class UnsafePath(ValueError):
    """A file name from the Hub that would land outside the cache directory."""


@dataclass(frozen=True)
class Layout:
    """Where one revision of one repository lives under a cache root."""

    root: Path
    repo: str
    revision: str = DEFAULT_REVISION

    @property
    def repo_dir(self) -> Path:
        return self.root / self.repo.replace("/", "--")

    @property
    def final(self) -> Path:
        return self.repo_dir / _path_safe(self.revision)

    @property
    def partial(self) -> Path:
        """The download's working directory, renamed to `final` when every file checked out."""
        return self.repo_dir / f".{_path_safe(self.revision)}.partial"

    @property
    def marker(self) -> Path:
        return self.final / MARKER

    @property
    def progress(self) -> Path:
        return self.repo_dir / f".{_path_safe(self.revision)}.progress.json"

    def complete(self) -> bool:
        return self.marker.is_file()


def _path_safe(revision: str) -> str:
    # Branch names may hold slashes; a commit hash or tag rarely holds anything else unusual.
    return revision.replace("/", "--")


def relative_file(name: str) -> PurePosixPath:
    """A repository file name as a path inside the cache directory; refuses `..` and absolute names."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or any(part in ("..", "") for part in path.parts) or "\\" in name:
        raise UnsafePath(f"the Hub listed a file name that is not a plain relative path: {name!r}")
    return path


@dataclass(frozen=True)
class RemoteFile:
    """One file as the Hub describes it: size, and the digest it must hash to."""

    name: str
    size: int
    sha256: str | None  # LFS files: the sha256 of the content
    blob_id: str | None  # other files: the git blob id (sha1 of "blob <size>\\0" + content)


def git_blob_hasher(size: int) -> Any:
    """A sha1 primed the way git hashes a blob: feed it the content, compare hexdigest() with blob_id."""
    hasher = hashlib.sha1(usedforsecurity=False)
    hasher.update(f"blob {size}\0".encode())
    return hasher


@dataclass(frozen=True)
class FetchResult:
    """What `llmservice-fetch` reports: one JSON line on stdout and in the container's termination message."""

    ok: bool
    reason: Reason
    message: str
    repo: str
    revision: str
    commit: str | None = None
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    path: str | None = None

    @property
    def exit_code(self) -> int:
        if self.ok:
            return 0
        return PERMANENT_EXIT if self.reason in PERMANENT else RETRYABLE_EXIT

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> FetchResult:
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Progress:
    """Bytes of a download done and expected, as /startupz reports them while the model is fetched."""

    done: int = 0
    total: int = 0
    files_done: int = 0
    files_total: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"bytes_done": self.done, "bytes_total": self.total, "files_done": self.files_done, "files_total": self.files_total}


def write_json_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_progress(path: Path) -> dict[str, int] | None:
    """The progress a fetch last wrote, or None when there is none (not fetching, or not yet)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    keys = ("bytes_done", "bytes_total", "files_done", "files_total")
    return {key: int(data.get(key, 0)) for key in keys}
