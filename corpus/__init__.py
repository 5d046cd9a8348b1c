"""Tokenized corpora: codes, manifests, shards, resume, run outputs, token streams, inputs, metadata schema."""
