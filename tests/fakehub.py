"""Moved to `devtools.fakehub`; this path stays for code written before the move (the same module object)."""

import sys

from devtools import fakehub

sys.modules[__name__] = fakehub
