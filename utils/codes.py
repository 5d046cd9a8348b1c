"""Alias of ``python -m corpus.codes`` for one release (moved; tests/layering.py ``ALIASES`` allows the import)."""

from corpus.codes import main

if __name__ == "__main__":
    raise SystemExit(main())
