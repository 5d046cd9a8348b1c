"""Token streams for LM trainers: a tokenized corpus as one flat token file and an index.

    python -m utils.tokens export codes/ stream/train --layout frame-major --offsets
    python -m utils.tokens check stream/train

writes, for a prefix ``P``:

- ``P.bin``: every file's tokens back to back, little-endian ``int16`` (``int32`` when a
  token does not fit), a flat array for ``numpy.memmap`` (Megatron- and Llasa-style loaders);
- ``P.idx.npy``: ``int64`` offsets, ``N + 1`` of them: file ``i`` is ``bin[idx[i]:idx[i+1]]``;
- ``P.json``: the layout (``frame-major`` or ``codebook-major``), ``n_q``, ``bins``, ``offsets``
  (whether codebook ``k`` adds ``k * bins``), the dtype, and per file its ``path`` and ``frames``.

Layouts of a file's ``(n_q, frames)`` codes: ``frame-major`` is ``codes.T.reshape(-1)``
(all codebooks of frame 0, then frame 1, ...: what YuE and VALL-E-style trainers read),
``codebook-major`` is ``codes.reshape(-1)`` (codebook 0 of every frame, then codebook 1, ...).
With ``offsets`` each token is ``k * bins + code`` (one vocabulary for all codebooks; YuE adds
its own global offset, 45334, on top).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.cli import DefaultsHelpFormatter
from utils.codes import CodesFileError, iter_corpus
from utils.files import atomic_write
from utils.schema import TOKEN_STREAM, read_json

LAYOUTS = ("frame-major", "codebook-major")


def flatten(codes: np.ndarray, layout: str, bins: int, offsets: bool) -> np.ndarray:
    """(n_q, frames) codes -> the 1-D token sequence of ``layout`` (int64)."""
    codes = np.asarray(codes, dtype=np.int64)
    if offsets:
        codes = codes + bins * np.arange(codes.shape[0])[:, None]
    return (codes.T if layout == "frame-major" else codes).reshape(-1)


def unflatten(tokens: np.ndarray, layout: str, n_q: int, bins: int, offsets: bool) -> np.ndarray:
    """The inverse of :func:`flatten`: (n_q, frames) codes."""
    tokens = np.asarray(tokens, dtype=np.int64)
    codes = tokens.reshape(-1, n_q).T if layout == "frame-major" else tokens.reshape(n_q, -1)
    return codes - bins * np.arange(n_q)[:, None] if offsets else codes


def export_stream(corpus: str | Path, prefix: str | Path, layout: str = "frame-major", offsets: bool = False) -> dict:
    """Write ``prefix.bin``, ``prefix.idx.npy`` and ``prefix.json`` from any corpus ``iter_corpus`` reads.

    Every file must have the same ``n_q`` and ``bins`` (one tokenization). Returns the metadata.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    files: list[dict] = []
    idx = [0]
    info: dict = {}  # n_q, bins and dtype, from the first file
    bin_path = prefix.with_name(prefix.name + ".bin")

    def write_bin(tmp: str) -> None:  # streamed: one file's tokens in memory at a time
        with open(tmp, "wb") as fh:
            for entry, codes in iter_corpus(corpus):
                if not info:
                    info["n_q"], info["bins"] = codes.shape[0], int(entry.get("bins", 1024))
                    top = (info["n_q"] * info["bins"] if offsets else info["bins"]) - 1
                    info["dtype"] = np.dtype(np.int16 if top < 2**15 else np.int32).newbyteorder("<")
                if codes.shape[0] != info["n_q"] or int(entry.get("bins", info["bins"])) != info["bins"]:
                    raise CodesFileError(
                        f"{entry['path']}: {codes.shape[0]} codebooks of {entry.get('bins')}; the corpus has {info['n_q']} of {info['bins']}"
                    )
                tokens = flatten(codes.numpy(), layout, info["bins"], offsets)
                fh.write(tokens.astype(info["dtype"]).tobytes())
                idx.append(idx[-1] + len(tokens))
                files.append({"path": entry["path"], "frames": int(codes.shape[1])})
        if not files:
            raise CodesFileError(f"{corpus}: no tokenized files")

    atomic_write(bin_path, write_bin, durable=True)
    meta = {"layout": layout, "n_q": info["n_q"], "bins": info["bins"], "offsets": offsets, "dtype": info["dtype"].name,
            "files": files, "tokens": idx[-1], "source": str(corpus)}  # fmt: skip

    def write_idx(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would add ".npy" to a temporary's name
            np.save(fh, np.asarray(idx, dtype=np.int64), allow_pickle=False)

    atomic_write(prefix.with_name(prefix.name + ".idx.npy"), write_idx)
    atomic_write(prefix.with_name(prefix.name + ".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, ensure_ascii=False) + "\n"))
    return meta


@dataclass
class TokenStream:
    """A token stream read back (memory-mapped): ``stream[i]`` is file ``i``'s tokens.

    Attributes:
        tokens: the flat ``numpy.memmap``.
        index: ``(N + 1,)`` int64 offsets.
        meta: the ``prefix.json`` contents.
    """

    tokens: np.ndarray
    index: np.ndarray
    meta: dict

    @staticmethod
    def open(prefix: str | Path) -> TokenStream:
        prefix = Path(prefix)
        meta = read_json(prefix.with_name(prefix.name + ".json"), TOKEN_STREAM, CodesFileError)
        index = np.load(prefix.with_name(prefix.name + ".idx.npy"), allow_pickle=False)
        tokens = np.memmap(prefix.with_name(prefix.name + ".bin"), dtype="<" + np.dtype(meta["dtype"]).str[1:], mode="r")
        if len(index) != len(meta["files"]) + 1 or int(index[-1]) != len(tokens):
            raise CodesFileError(f"{prefix}: index and token file disagree ({len(index) - 1} files, {len(tokens)} tokens)")
        return TokenStream(tokens, index, meta)

    def __len__(self) -> int:
        return len(self.index) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.index[i] : self.index[i + 1]])

    def codes(self, i: int) -> torch.Tensor:
        """File ``i`` as a ``LongTensor`` (n_q, frames), offsets removed."""
        m = self.meta
        return torch.from_numpy(unflatten(self[i], m["layout"], m["n_q"], m["bins"], m["offsets"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m utils.tokens", description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write PREFIX.bin / .idx.npy / .json from a tokenized corpus", formatter_class=DefaultsHelpFormatter)
    ex.add_argument("corpus", type=Path, help="a --codes-out directory (npy, parquet or webdataset) or one shard")
    ex.add_argument("prefix", type=Path, help="output prefix")
    ex.add_argument("--layout", choices=LAYOUTS, default="frame-major", help="token order within a file")
    ex.add_argument("--offsets", action="store_true", help="token = k * bins + code (one vocabulary for all codebooks)")
    ck = sub.add_parser("check", help="open a stream and decode every file back to codes", formatter_class=DefaultsHelpFormatter)
    ck.add_argument("prefix", type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "export":
            meta = export_stream(args.corpus, args.prefix, args.layout, args.offsets)
            print(f"wrote {args.prefix}.bin ({meta['tokens']} {meta['dtype']} tokens of {len(meta['files'])} file(s)), .idx.npy, .json")
        else:
            stream = TokenStream.open(args.prefix)
            for i in range(len(stream)):
                stream.codes(i)
            print(f"{len(stream)} file(s), {len(stream.tokens)} tokens, layout {stream.meta['layout']}")
    except (CodesFileError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
