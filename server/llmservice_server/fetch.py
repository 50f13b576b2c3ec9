"""`llmservice-fetch`: download one Hugging Face repository revision into the model cache, checked.

Every file is written as `<name>.incomplete` and resumed from its length on the next run (a Job
pod restarted mid-download keeps what it had), then hashed against the Hub's metadata - sha256 for
LFS files, the git blob id for the rest - and only then given its name. When every file checked
out, the marker is written and the directory renamed into place; a file that does not match is
deleted and the fetch fails, so a truncated or corrupt file is never cached as complete.

The result is one JSON line on stdout and in the container's termination message, which is where
the operator reads it; the exit code tells the Job whether a retry can help (see model_cache).
HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE mean what they mean to huggingface_hub.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, cast

import httpx2
from huggingface_hub import HfApi, hf_hub_url
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.file_download import http_get
from huggingface_hub.utils._headers import build_hf_headers  # public as huggingface_hub.utils.build_hf_headers, which mypy cannot see

from .logs import configure_logging
from .model_cache import (
    DEFAULT_REVISION,
    FetchResult,
    Layout,
    Progress,
    Reason,
    RemoteFile,
    UnsafePath,
    git_blob_hasher,
    relative_file,
    write_json_atomically,
)

log = logging.getLogger(__name__)

TERMINATION_LOG = Path("/dev/termination-log")
PROGRESS_INTERVAL_SECONDS = 0.5
_COMMIT_FILE = ".llmservice-commit"  # in the working directory: the commit its files were checked against
_HASH_CHUNK = 8 * 2**20


class FetchFailed(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.message = message


class _Counting:
    """The file `http_get` writes to, counting what it writes (the progress of the whole fetch)."""

    def __init__(self, file: BinaryIO, on_bytes: Callable[[int], None]) -> None:
        self._file = file
        self._on_bytes = on_bytes

    def write(self, data: bytes) -> int:
        written = self._file.write(data)
        self._on_bytes(written)
        return written

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def truncate(self, size: int | None = None) -> int:
        # http_get truncates when a server ignored its Range and sends the whole file again.
        self._file.flush()
        before = os.fstat(self._file.fileno()).st_size
        after = self._file.truncate(size)
        self._on_bytes(after - before)
        return after


class _Reporter:
    """Progress to a callback, at most every PROGRESS_INTERVAL_SECONDS (and at every file's end)."""

    def __init__(self, total: int, files: int, report: Callable[[Progress], None] | None) -> None:
        self.progress = Progress(0, total, 0, files)
        self._report = report
        self._last = 0.0

    def add(self, count: int, *, file_done: bool = False, force: bool = False) -> None:
        p = self.progress
        self.progress = Progress(p.done + count, p.total, p.files_done + int(file_done), p.files_total)
        now = time.monotonic()
        if self._report is not None and (force or file_done or now - self._last >= PROGRESS_INTERVAL_SECONDS):
            self._last = now
            self._report(self.progress)


def fetch(
    repo: str,
    revision: str | None,
    root: Path,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    report: Callable[[Progress], None] | None = None,
) -> FetchResult:
    """Fetch `repo` at `revision` into `root`; never raises for a failure it can name.

    One fetch of a revision at a time (a file lock beside it): server workers that start together
    wait for the first, then find its copy complete.
    """
    layout = Layout(root, repo, revision or DEFAULT_REVISION)
    try:
        layout.repo_dir.mkdir(parents=True, exist_ok=True)
        lock = layout.repo_dir / f".{layout.final.name}.lock"
        with lock.open("a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            return _fetch_locked(layout, endpoint, token, report)
    except OSError as error:
        reason, message = _os_failure(error, layout)
        return FetchResult(ok=False, reason=reason, message=message, repo=repo, revision=layout.revision)


def _fetch_locked(layout: Layout, endpoint: str | None, token: str | None, report: Callable[[Progress], None] | None) -> FetchResult:
    repo, revision = layout.repo, layout.revision
    started = time.monotonic()
    if layout.complete():
        cached = FetchResult.from_json(layout.marker.read_text())
        return dataclasses.replace(cached, seconds=0.0, message=f"{repo}@{revision} is already cached.")
    done_files, done_bytes = 0, 0
    try:
        commit, files = _listing(repo, revision, endpoint, token)
        total = sum(f.size for f in files)
        _start_partial(layout, commit)
        _check_space(layout, files)
        reporter = _Reporter(total, len(files), report)
        for remote in files:
            _fetch_file(layout, repo, commit, remote, endpoint, token, reporter)
            done_files, done_bytes = reporter.progress.files_done, reporter.progress.done
        result = FetchResult(
            ok=True,
            reason="Fetched",
            message=f"Fetched {len(files)} files ({total} bytes) of {repo}@{revision}.",
            repo=repo,
            revision=revision,
            commit=commit,
            files=len(files),
            bytes=total,
            seconds=round(time.monotonic() - started, 3),
            path=str(layout.final),
        )
        (layout.partial / _COMMIT_FILE).unlink()
        (layout.partial / layout.marker.name).write_text(result.to_json())
        _move_into_place(layout)
        layout.progress.unlink(missing_ok=True)
        return result
    except FetchFailed as failure:
        reason, message = failure.reason, failure.message
    except OSError as error:
        reason, message = _os_failure(error, layout)
    return FetchResult(
        ok=False,
        reason=reason,
        message=message,
        repo=repo,
        revision=revision,
        files=done_files,
        bytes=done_bytes,
        seconds=round(time.monotonic() - started, 3),
    )


def _start_partial(layout: Layout, commit: str) -> None:
    """The working directory, kept from an interrupted run only when that run fetched the same commit.

    A branch can move between two runs; files checked against the old commit's metadata must not
    be mixed with the new commit's.
    """
    stamp = layout.partial / _COMMIT_FILE
    if layout.partial.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != commit):
        log.info("Discarding an interrupted download of another commit", extra={"path": str(layout.partial)})
        shutil.rmtree(layout.partial)
    layout.partial.mkdir(parents=True, exist_ok=True)
    stamp.write_text(commit)


def _listing(repo: str, revision: str | None, endpoint: str | None, token: str | None) -> tuple[str, list[RemoteFile]]:
    """The commit the revision points at, and every file in it with its size and digest."""
    where = f"{repo}@{revision or DEFAULT_REVISION}"
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo, revision=revision, files_metadata=True)
    except GatedRepoError:  # before its base class, RepositoryNotFoundError
        raise FetchFailed(
            "Gated",
            f"{repo} is gated: accept its terms on the Hub with the account whose token is in "
            "spec.model.tokenSecretRef (set one if none is)."
            if token is None and not os.environ.get("HF_TOKEN")
            else f"{repo} is gated and the token given has not been granted access: accept its terms on the Hub with that token's account.",
        ) from None
    except RevisionNotFoundError:
        raise FetchFailed(
            "RevisionNotFound",
            f"Revision {revision!r} of {repo} does not exist on the Hub: check spec.model.source.huggingFace.revision "
            "(a branch, tag or full commit hash).",
        ) from None
    except RepositoryNotFoundError as error:
        raise _not_found_or_private(repo, error, token) from None
    except HfHubHTTPError as error:
        raise _http_failure(where, error) from None
    except (httpx2.HTTPError, ConnectionError) as error:
        raise _unreachable(endpoint, error) from None
    if not info.sha:
        raise FetchFailed("Failed", f"The Hub named no commit for {where}.")
    files = []
    for sibling in info.siblings or []:
        try:
            relative_file(sibling.rfilename)
        except UnsafePath as error:
            raise FetchFailed("Corrupt", str(error)) from None
        if sibling.size is None:
            raise FetchFailed("Failed", f"The Hub gave no size for {sibling.rfilename} in {where}: cannot check it.")
        lfs = sibling.lfs
        files.append(RemoteFile(sibling.rfilename, int(sibling.size), lfs.sha256 if lfs else None, sibling.blob_id))
    if not files:
        raise FetchFailed("RepoNotFound", f"{where} has no files.")
    return info.sha, sorted(files, key=lambda f: f.name)


def _not_found_or_private(repo: str, error: HfHubHTTPError, token: str | None) -> FetchFailed:
    status = error.response.status_code if error.response is not None else 0
    anonymous = token is None and not os.environ.get("HF_TOKEN")
    if status == 401 and anonymous:
        return FetchFailed(
            "Unauthorized",
            f"The Hub refused {repo} without a token (HTTP 401): it is private or gated, or does not exist. "
            "Set spec.model.tokenSecretRef to a Secret holding a Hugging Face token with access, "
            "or check spec.model.source.huggingFace.repo.",
        )
    if status in (401, 403):
        return FetchFailed(
            "Unauthorized",
            f"The Hub refused {repo} with the token given (HTTP {status}): the token is invalid or its account has "
            "no access; check the Secret named in spec.model.tokenSecretRef.",
        )
    return FetchFailed(
        "RepoNotFound",
        f"Repository {repo} was not found on the Hub (HTTP {status}): check spec.model.source.huggingFace.repo "
        "(owner/name, as in the model page's URL).",
    )


def _http_failure(where: str, error: HfHubHTTPError) -> FetchFailed:
    status = error.response.status_code if error.response is not None else 0
    if status in (401, 403):
        return FetchFailed(
            "Unauthorized",
            f"The Hub refused {where} (HTTP {status}): set spec.model.tokenSecretRef to a token with access.",
        )
    return FetchFailed("Unreachable", f"The Hub answered HTTP {status} for {where}; the Job retries.")


def _unreachable(endpoint: str | None, error: BaseException) -> FetchFailed:
    return FetchFailed(
        "Unreachable",
        f"Could not reach the Hub at {endpoint or 'https://huggingface.co'} ({type(error).__name__}: {error}); "
        "the Job retries. Check the cluster's egress, proxy or HF_ENDPOINT.",
    )


def _check_space(layout: Layout, files: list[RemoteFile]) -> None:
    needed = sum(f.size - _already(layout, f) for f in files)
    free = shutil.disk_usage(layout.partial).free
    if needed > free:
        raise FetchFailed(
            "DiskFull",
            f"The model needs {needed} more bytes but the cache volume has {free} free: "
            "raise spec.model.cache.size (a new size needs a storage class that allows expansion).",
        )


def _already(layout: Layout, remote: RemoteFile) -> int:
    target = layout.partial / relative_file(remote.name)
    if target.is_file():
        return target.stat().st_size
    incomplete = target.with_name(target.name + ".incomplete")
    return min(incomplete.stat().st_size, remote.size) if incomplete.is_file() else 0


def _fetch_file(
    layout: Layout, repo: str, commit: str, remote: RemoteFile, endpoint: str | None, token: str | None, reporter: _Reporter
) -> None:
    target = layout.partial / relative_file(remote.name)
    if target.is_file() and target.stat().st_size == remote.size:
        reporter.add(remote.size, file_done=True)  # checked before it was given its name
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    incomplete = target.with_name(target.name + ".incomplete")
    with incomplete.open("ab") as file:
        resume = file.tell()
        if resume > remote.size:  # longer than the file can be: not ours to trust
            file.truncate(0)
            resume = 0
        reporter.add(resume, force=True)
        if resume:
            log.info("Resuming download", extra={"file": remote.name, "offset": resume, "size": remote.size})
        url = hf_hub_url(repo, remote.name, revision=commit, endpoint=endpoint)
        try:
            http_get(
                url,
                cast(BinaryIO, _Counting(file, reporter.add)),
                resume_size=resume,
                headers=build_hf_headers(token=token),
                expected_size=remote.size,
                displayed_filename=remote.name,
            )
        except HfHubHTTPError as error:
            raise _http_failure(f"{repo}/{remote.name}", error) from None
        except httpx2.HTTPError as error:
            raise _unreachable(endpoint, error) from None
    problem = _mismatch(incomplete, remote)
    if problem is not None:
        incomplete.unlink()  # never kept: the next run downloads it again from the start
        raise FetchFailed("Corrupt", f"{remote.name} of {repo}@{layout.revision} {problem}; it was discarded, the Job retries.")
    incomplete.replace(target)
    reporter.add(0, file_done=True)


def _mismatch(path: Path, remote: RemoteFile) -> str | None:
    """Why the downloaded file is not the one the Hub describes, or None when it is."""
    size = path.stat().st_size
    if size != remote.size:
        return f"has {size} bytes where the Hub lists {remote.size}"
    hasher: Any
    if remote.sha256 is not None:
        hasher, expected, kind = hashlib.sha256(), remote.sha256, "sha256"
    elif remote.blob_id is not None:
        hasher, expected, kind = git_blob_hasher(remote.size), remote.blob_id, "git blob id"
    else:
        return None  # the Hub gave only the size, and it matched
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            hasher.update(chunk)
    actual = hasher.hexdigest()
    return None if actual == expected else f"hashes to {kind} {actual}, not the Hub's {expected}"


def _move_into_place(layout: Layout) -> None:
    try:
        layout.partial.rename(layout.final)
    except OSError:
        if not layout.complete():  # another fetch of the same revision finished first: theirs is as good
            raise
        shutil.rmtree(layout.partial, ignore_errors=True)


def _os_failure(error: OSError, layout: Layout) -> tuple[Reason, str]:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "DiskFull", (f"The cache volume is full while writing {layout.repo}@{layout.revision}: raise spec.model.cache.size.")
    if "Consistency check failed" in str(error):
        return "Corrupt", f"A download of {layout.repo}@{layout.revision} ended short ({error}); the Job retries."
    return "Failed", f"Could not write the model cache at {layout.root}: {error}"


def progress_writer(layout: Layout) -> Callable[[Progress], None]:
    """A report callback that keeps the layout's progress file current (read by /startupz)."""

    def write(progress: Progress) -> None:
        write_json_atomically(layout.progress, json.dumps(progress.to_dict()))

    return write


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmservice-fetch",
        description="Download a Hugging Face model repository at a revision into a cache directory, checked file by file.",
    )
    parser.add_argument("--repo", required=True, help="owner/name of the model repository")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main); pin a commit")
    parser.add_argument("--cache-dir", type=Path, required=True, help="the cache root (the model cache volume)")
    parser.add_argument("--endpoint", default=os.environ.get("HF_ENDPOINT") or None, help="Hub URL (default: HF_ENDPOINT)")
    parser.add_argument(
        "--termination-log",
        type=Path,
        default=TERMINATION_LOG,
        help="where the result is also written for the operator (if the path is writable)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    layout = Layout(args.cache_dir, args.repo, args.revision or DEFAULT_REVISION)
    token = os.environ.get("HF_TOKEN") or None
    result = fetch(args.repo, args.revision, args.cache_dir, endpoint=args.endpoint, token=token, report=progress_writer(layout))
    line = result.to_json()
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if args.termination_log.parent.is_dir():
        try:
            args.termination_log.write_text(line[:4096])  # the kubelet keeps at most 4096 bytes
        except OSError as error:
            log.warning("Could not write the termination log", extra={"path": str(args.termination_log), "error": str(error)})
    level = logging.INFO if result.ok else logging.ERROR
    log.log(level, result.message, extra={"reason": result.reason, "files": result.files, "bytes": result.bytes})
    sys.exit(result.exit_code)


if __name__ == "__main__":
    main()
