"""The LLMService demo, end to end on this machine.

1. start a local Kubernetes control plane (etcd, API server, controllers, scheduler, kwok GPU nodes);
2. `helm install` the operator chart (CRD + RBAC);
3. run the operator as the chart's ServiceAccount;
4. `kubectl apply` the example LLMServices and watch them become Ready;
5. run the inference server here with the environment the operator rendered for one of them,
   and ask it a question through the official `openai` client;
6. print where that replica's cold start went: status.startup (the kwok pod's timestamps) and the
   real server's own fetch / load / warmup seconds from its /startupz.

Nothing is left running unless --keep is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from devtools.controlplane import ControlPlane
from devtools.operator_harness import OperatorProcess, get_json, helm_install, service_account_kubeconfig
from devtools.ports import free_port
from devtools.waiting import wait_for
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]

EXAMPLES = ("minimal-cpu.yaml", "gpu.yaml", "autoscaled-queue-depth.yaml")
SERVED_EXAMPLE = "smollm2"
QUESTION = "What is the capital of France?"

log = logging.getLogger("demo")


def step(message: str) -> None:
    log.info("\033[1m==> %s\033[0m", message)


@contextmanager
def control_plane(state_dir: Path, keep: bool) -> Iterator[ControlPlane]:
    step("Starting a local Kubernetes control plane (binaries are built once into the cache)")
    plane = ControlPlane(state_dir).start()
    log.info("    KUBECONFIG=%s", plane.kubeconfig)
    try:
        yield plane
    finally:
        if keep:
            log.info("    left running; stop it with: scripts/cluster down --state-dir %s", state_dir)
        else:
            step("Stopping the control plane")
            plane.stop()


def server_env(plane: ControlPlane, namespace: str, name: str) -> dict[str, str]:
    """The server settings the operator rendered into the Deployment, as plain values."""
    deployment = get_json(plane, "deployment", name, "-n", namespace)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def run_server(env: dict[str, str], port: int, log_path: Path) -> subprocess.Popen[bytes]:
    local = {**os.environ, **env, "LLMSERVICE_HOST": "127.0.0.1", "LLMSERVICE_PORT": str(port)}
    # Inside a pod these point at mounted volumes; here the user's cache stands in for them.
    for key in ("LLMSERVICE_CACHE_DIR", "HF_HOME"):
        local.pop(key, None)
    with log_path.open("wb") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "llmservice-server")],
            env=local,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def ask(port: int, model: str) -> tuple[str, dict[str, Any]]:
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo")
    started = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0)
    elapsed = time.perf_counter() - started
    usage = reply.usage.model_dump() if reply.usage else {}
    usage["seconds"] = round(elapsed, 2)
    return reply.choices[0].message.content or "", usage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the control plane and operator running")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("devtools.controlplane").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="llmservice-demo-"))
    namespace = "demo"

    with control_plane(workdir / "cluster", args.keep) as plane:
        step("helm install the operator chart (CRD, ServiceAccount, least-privilege RBAC)")
        helm_install(plane)
        step("Running the operator as the chart's ServiceAccount")
        operator = OperatorProcess(service_account_kubeconfig(plane, workdir / "operator.kubeconfig"), workdir / "operator.log")
        operator.start()
        try:
            step(f"kubectl apply the examples: {', '.join(EXAMPLES)}")
            plane.kubectl("create", "namespace", namespace)
            for example in EXAMPLES:
                plane.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / example))

            def all_ready() -> bool:
                items = get_json(plane, "llmsvc", "-n", namespace)["items"]
                return bool(items) and all(
                    any(c["type"] == "Ready" and c["status"] == "True" for c in (i.get("status") or {}).get("conditions", []))
                    for i in items
                )

            step("qwen-7b asks for an NVIDIA-L4 GPU; the cluster only has A100 nodes. Its status says so:")
            wait_for(
                lambda: _ready_reason(plane, namespace, "qwen-7b") in ("Unschedulable", "InsufficientGPU"),
                90,
                "qwen-7b to report why it cannot be scheduled",
            )
            log.info("    Ready=False: %s", _ready_message(plane, namespace, "qwen-7b"))
            step("Adding an NVIDIA-L4 node, as a cluster autoscaler would for that pending pod")
            plane.add_gpu_node("demo-l4-node", 1, product="NVIDIA-L4")
            wait_for(all_ready, 120, "every example LLMService to become Ready")
            sys.stdout.write(plane.kubectl("get", "llmsvc", "-n", namespace, "-o", "wide").stdout)

            step(f"Running the inference server here with the env the operator rendered for {SERVED_EXAMPLE}")
            env = server_env(plane, namespace, SERVED_EXAMPLE)
            for key in sorted(env):
                log.info("    %s=%s", key, env[key])
            port = free_port()
            server = run_server(env, port, workdir / "server.log")
            try:
                step("Loading SmolLM2-135M-Instruct (the first start converts the GGUF file, ~30 s)")
                wait_for(lambda: _ready(port, server, workdir / "server.log"), 300, "the server's /readyz")
                step(f"Asking through the openai client: {QUESTION!r}")
                answer, usage = ask(port, env["LLMSERVICE_SERVED_MODEL_NAME"])
                sys.stdout.write(f"\n{answer.strip()}\n\n")
                log.info("    usage: %s", json.dumps(usage))
                step(f"Where {SERVED_EXAMPLE}'s cold start went (docs/cold-start.md)")
                print_startup(plane, namespace, port)
            finally:
                server.terminate()
                server.wait(60)
        finally:
            if not args.keep:
                operator.stop()
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    step("Done")
    return 0


def print_startup(plane: ControlPlane, namespace: str, port: int) -> None:
    """status.startup of the kwok replica, then the stages the server here measured while it started."""
    startup = get_json(plane, "llmsvc", SERVED_EXAMPLE, "-n", namespace).get("status", {}).get("startup") or {}
    log.info("    status.startup (pod %s; a kwok node runs no server, so its container time is all 'other'):", startup.get("pod", "?"))
    for phase in ("scheduling", "image", "fetch", "load", "warmup", "other", "total"):
        if phase in startup:
            log.info("      %-10s %8.1f s", phase, startup[phase])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/startupz", timeout=5) as response:
        stages = json.loads(response.read()).get("stages") or {}
    log.info("    the server here, /startupz (what a real replica adds to status.startup):")
    for phase in ("fetch", "load", "warmup"):
        log.info("      %-10s %8.1f s", phase, stages.get(phase, 0.0))


def _ready_condition(plane: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    status = get_json(plane, "llmsvc", name, "-n", namespace).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})


def _ready_reason(plane: ControlPlane, namespace: str, name: str) -> str:
    return str(_ready_condition(plane, namespace, name).get("reason", ""))


def _ready_message(plane: ControlPlane, namespace: str, name: str) -> str:
    return str(_ready_condition(plane, namespace, name).get("message", ""))


def _ready(port: int, server: subprocess.Popen[bytes], log_path: Path) -> bool:
    if server.poll() is not None:
        raise RuntimeError(f"the server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(main())
