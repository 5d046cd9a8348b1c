"""Alias of ``python -m corpus.tokens`` for one release (moved; tests/layering.py ``ALIASES`` allows the import)."""

from corpus.tokens import main

if __name__ == "__main__":
    raise SystemExit(main())
