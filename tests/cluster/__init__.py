"""The local control plane moved to `devtools.controlplane`; this package re-exports it for older imports."""

from devtools.controlplane import *  # noqa: F403
from devtools.controlplane import __all__ as __all__
