"""The reason a server process gives up, written where Kubernetes reads it.

A container's `terminationMessagePath` (default `/dev/termination-log`) becomes its
`lastState.terminated.message`: the operator shows it in the LLMService status, and a person
sees why the pod restarts without reading its logs. The kubelet keeps at most 4 KiB of it, so
the reason is one line cut to that. A path that cannot be written (running outside a pod, a
read-only file system) is skipped: the same reason is in the log either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MAX_BYTES = 4096  # the kubelet's limit on a termination message
_ELLIPSIS = "..."


def one_line(reason: str, limit: int = MAX_BYTES) -> str:
    """`reason` on one line (newlines become spaces), at most `limit` bytes of UTF-8 with its newline."""
    flat = " ".join(reason.split())
    encoded = flat.encode()
    if len(encoded) + 1 <= limit:
        return flat + "\n"
    cut = encoded[: limit - 1 - len(_ELLIPSIS)].decode(errors="ignore")  # never half a character
    return cut + _ELLIPSIS + "\n"


def write_termination_log(path: Path, reason: str) -> bool:
    """Write `reason` to `path` as one line; False (and nothing raised) when it cannot be written."""
    try:
        with path.open("w", encoding="utf-8") as out:
            out.write(one_line(reason))
    except OSError as exc:
        log.debug("Termination log not written", extra={"path": str(path), "error": str(exc)})
        return False
    return True
