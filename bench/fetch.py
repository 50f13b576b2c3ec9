"""What `llmservice-fetch`'s checks cost: one repository of a given size fetched from the local fake Hub.

Loopback takes the network out, so the numbers show the fetch's own costs beside huggingface_hub's
plain `hf_hub_download` of the same file from the same server (which checks no hash): writing the
file, hashing it against the Hub's sha256, the rename, and a second run that finds the revision
complete. It never fails on a number; it prints one JSON object.

    .venv/bin/python -m bench.fetch --mib 512
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from devtools.fakehub import FakeHub
from huggingface_hub import hf_hub_download

from llmservice_server.fetch import fetch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the weights file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    weights = os.urandom(args.mib * 2**20)
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights}
    runs = []
    with FakeHub() as hub, tempfile.TemporaryDirectory() as root:
        commit = hub.add_repo("bench/model", files)
        for repeat in range(args.repeats):
            target = Path(root) / str(repeat)
            started = time.perf_counter()
            result = fetch("bench/model", commit, target, endpoint=hub.url)
            fetched = time.perf_counter() - started
            assert result.ok, result.message
            started = time.perf_counter()
            again = fetch("bench/model", commit, target, endpoint=hub.url)
            cached = time.perf_counter() - started
            assert again.ok
            started = time.perf_counter()
            hf_hub_download("bench/model", "model.safetensors", revision=commit, endpoint=hub.url, local_dir=Path(root) / f"plain{repeat}")
            plain = time.perf_counter() - started
            started = time.perf_counter()
            with (target / "bench--model" / commit / "model.safetensors").open("rb") as data:
                hashlib.file_digest(data, "sha256")
            hashing = time.perf_counter() - started
            runs.append(
                {
                    "fetch_seconds": round(fetched, 3),
                    "cached_seconds": round(cached, 4),
                    "sha256_seconds": round(hashing, 3),
                    "mib_per_second": round(args.mib / fetched, 1),
                    "hf_hub_download_seconds": round(plain, 3),
                }
            )
    sys.stdout.write(json.dumps({"mib": args.mib, "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
