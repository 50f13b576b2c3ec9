"""Tooling that tests, benchmarks and scripts share; never imported by the operator or the server.

- `controlplane`: a local Kubernetes control plane (etcd, API server, controllers, kwok nodes);
- `operator_harness`: the real operator process against it, as the chart's ServiceAccount;
- `tiny_model`: a tiny random-weight Llama with a locally trained tokenizer (`tiny_tokenizer`, no torch);
- `fake_engine`: a scripted engine (`Backend`) for the server's in-process tier;
- `fakehub`: a local stand-in for the Hugging Face Hub;
- `waiting` (`wait_for`, `assert_stays`), `ports` (`free_port`), `prometheus` (`scrape`).

Importable from the repository root (pytest's `pythonpath`, `python -m ...`), like `tests`.
"""
