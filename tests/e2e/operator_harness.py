"""Moved to `devtools.operator_harness`; this path stays for code written before the move (the same module object)."""

import sys

from devtools import operator_harness

sys.modules[__name__] = operator_harness
