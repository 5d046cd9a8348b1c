"""Alias of ``python -m corpus.codes`` for one release (moved; tests/layering.py ``ALIASES`` allows the import)."""

import sys

from corpus.codes import main

if __name__ == "__main__":
    sys.exit(main())
