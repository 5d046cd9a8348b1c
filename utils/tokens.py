"""Alias of ``python -m corpus.tokens`` for one release (moved; tests/layering.py ``ALIASES`` allows the import)."""

import sys

from corpus.tokens import main

if __name__ == "__main__":
    sys.exit(main())
