"""Alias of ``python -m corpus.codes`` for one release: the module moved to corpus/codes.py.

An explicit exception in tests/layering.py (``ALIASES``) lets this file import upward.
"""

import sys

from corpus.codes import main

if __name__ == "__main__":
    sys.exit(main())
