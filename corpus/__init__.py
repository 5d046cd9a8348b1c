"""Tokenized corpora: codes files and manifests, shards, resume, what a CLI run writes, token
streams, the input collector and the metadata schema (``python -m corpus.codes``,
``python -m corpus.tokens``)."""
