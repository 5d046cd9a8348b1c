"""Alias of ``python -m corpus.tokens`` for one release: the module moved to corpus/tokens.py.

An explicit exception in tests/layering.py (``ALIASES``) lets this file import upward.
"""

import sys

from corpus.tokens import main

if __name__ == "__main__":
    sys.exit(main())
