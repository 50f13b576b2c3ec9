"""matplotlib for the benchmarks' plots: optional (the `bench` extra), headless."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None (with a warning) when matplotlib is not installed."""
    try:
        import matplotlib  # optional: only the plots need it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    return plt
