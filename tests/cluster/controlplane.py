"""Moved to `devtools.controlplane`; this path stays for code written before the move (the same module object)."""

import sys

from devtools import controlplane

sys.modules[__name__] = controlplane
