"""Moved to `devtools.tiny_model`; this path stays for code written before the move (the same module object)."""

import sys

from devtools import tiny_model

sys.modules[__name__] = tiny_model
