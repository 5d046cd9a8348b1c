"""Token streams for LM trainers: a tokenized corpus as one flat token file and an index.
``python -m corpus.tokens export|check`` write and check, for a prefix ``P``, Megatron-LM's indexed dataset
(``P.bin``, ``P.idx``) and our ``P.json`` (docs/tokenization.md; an older ``P.idx.npy`` is still read)."""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from corpus.codes import CodesFileError, iter_corpus
from corpus.schema import TOKEN_STREAM, codes_dtype, read_json, write_json
from utils.cli import argument_parser, cli_main
from utils.files import atomic_write

LAYOUTS = ("frame-major", "codebook-major")
DEFAULT_BINS = 1024  # the codebook size of a file that records none (a .npy without its .json)
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
# .idx: magic, this head, N int32 sequence lengths, N int64 byte offsets, N + 1 int64 document indices
MEGATRON_HEAD = struct.Struct("<QBQQ")  # version, dtype code, sequence count, document count
TOKEN_DTYPES = {"int16": 3, "int32": 4}  # the dtypes a stream may hold, with Megatron's codes for them


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


def megatron_index(lengths: list[int], dtype: str) -> bytes:
    """Megatron-LM's ``.idx`` for sequences of ``lengths`` tokens of ``dtype``, one document each."""
    lengths_arr = np.asarray(lengths, dtype="<i4")
    pointers = np.zeros(len(lengths), dtype="<i8")
    np.cumsum(lengths_arr[:-1] * np.dtype(dtype).itemsize, out=pointers[1:])  # byte offsets
    head = MEGATRON_MAGIC + MEGATRON_HEAD.pack(1, TOKEN_DTYPES[dtype], len(lengths), len(lengths) + 1)
    return head + lengths_arr.tobytes() + pointers.tobytes() + np.arange(len(lengths) + 1, dtype="<i8").tobytes()


def read_megatron_index(path: Path) -> tuple[str, np.ndarray]:
    """``(dtype name, (N + 1,) int64 token offsets)`` of a Megatron ``.idx``, every field checked (never misread)."""
    raw = path.read_bytes()
    head = len(MEGATRON_MAGIC) + MEGATRON_HEAD.size
    if len(raw) < head or not raw.startswith(MEGATRON_MAGIC):
        raise CodesFileError(f"{path}: not a Megatron index (no MMIDIDX header)")
    version, code, n, docs = MEGATRON_HEAD.unpack_from(raw, len(MEGATRON_MAGIC))
    names = {c: name for name, c in TOKEN_DTYPES.items()}
    if version != 1 or code not in names:
        raise CodesFileError(f"{path}: Megatron index version {version}, dtype code {code}; "
                             "expected version 1, dtype int16 or int32")  # fmt: skip
    if len(raw) != head + 12 * n + 8 * docs:
        size = head + 12 * n + 8 * docs
        raise CodesFileError(f"{path}: {len(raw)} bytes, not the {size} of {n} sequences and {docs} documents")
    lengths = np.frombuffer(raw, "<i4", n, head).astype(np.int64)
    pointers = np.frombuffer(raw, "<i8", n, head + 4 * n)
    documents = np.frombuffer(raw, "<i8", docs, head + 12 * n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if (lengths < 0).any() or not np.array_equal(pointers, offsets[:-1] * np.dtype(names[code]).itemsize):
        raise CodesFileError(f"{path}: sequence lengths and pointers are not contiguous and increasing")
    if not np.array_equal(documents, np.arange(n + 1)):
        raise CodesFileError(f"{path}: expected one sequence per document (document indices 0..{n})")
    return names[code], offsets


def export_stream(corpus: str | Path, prefix: str | Path, layout: str = "frame-major", offsets: bool = False,
                  bins: int | None = None) -> dict:  # fmt: skip
    """Write ``prefix.bin``, ``.idx`` (Megatron) and ``.json`` from any corpus ``iter_corpus`` reads (one ``n_q``
    and ``bins``) in ``layout`` (:data:`LAYOUTS`), a token ``k * bins + code`` with ``offsets``; returns the
    metadata. ``bins``: of files that record none (default 1024). A code ``>= bins`` is refused (CodesFileError
    naming the file): with ``offsets`` it would be a token of the next codebook."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    files, lengths, info = [], [], {}  # info: n_q, bins and dtype, from the first file

    def write_bin(tmp: str) -> None:  # streamed: one file's tokens in memory at a time
        with open(tmp, "wb") as fh:
            for entry, codes in iter_corpus(corpus):
                where, file_bins = entry.get("path"), int(entry.get("bins") or bins or DEFAULT_BINS)
                if bins is not None and file_bins != bins:
                    raise CodesFileError(f"{where}: tokenized with {file_bins} bins; --bins says {bins}")
                if not info:
                    info["n_q"], info["bins"] = codes.shape[0], file_bins
                    top = (info["n_q"] * info["bins"] if offsets else info["bins"]) - 1
                    if top >= 2**31:
                        raise CodesFileError(f"{where}: {info['n_q']} codebooks of {file_bins} do not fit int32 tokens")
                    info["dtype"] = codes_dtype(top + 1)
                if codes.shape[0] != info["n_q"] or file_bins != info["bins"]:
                    raise CodesFileError(f"{where}: {codes.shape[0]} codebooks of {file_bins}; the corpus has "
                                         f"{info['n_q']} of {info['bins']}")  # fmt: skip
                if int(codes.max()) >= info["bins"]:
                    raise CodesFileError(f"{where}: code {int(codes.max())} >= bins {info['bins']} (a token of the "
                                         "next codebook with --offsets, wrapped in the stream's dtype); pass --bins "
                                         "for files that record none")  # fmt: skip
                tokens = flatten(codes.numpy(), layout, info["bins"], offsets)
                if len(tokens) >= 2**31:  # Megatron's sequence lengths are int32
                    raise CodesFileError(f"{where}: {len(tokens)} tokens, more than a Megatron sequence holds")
                fh.write(tokens.astype("<" + np.dtype(info["dtype"]).str[1:]).tobytes())
                lengths.append(len(tokens))
                files.append({"path": entry["path"], "frames": int(codes.shape[1])})
        if not files:
            raise CodesFileError(f"{corpus}: no tokenized files")

    atomic_write(Path(f"{prefix}.bin"), write_bin, durable=True)
    meta = {"layout": layout, "n_q": info["n_q"], "bins": info["bins"], "offsets": offsets, "dtype": info["dtype"],
            "files": files, "tokens": sum(lengths), "source": str(corpus)}  # fmt: skip
    atomic_write(Path(f"{prefix}.idx"), lambda tmp: Path(tmp).write_bytes(megatron_index(lengths, info["dtype"])))
    write_json(Path(f"{prefix}.json"), meta)
    Path(f"{prefix}.idx.npy").unlink(missing_ok=True)  # an earlier export's index would describe another .bin
    return meta


@dataclass
class TokenStream:
    """A token stream read back (memory-mapped): ``stream[i]`` is file ``i``'s tokens."""

    tokens: np.ndarray  # the flat memmap, (total tokens,)
    index: np.ndarray  # (N + 1,) int64 token offsets: file i is tokens[index[i]:index[i + 1]]
    meta: dict  # prefix.json

    @staticmethod
    def open(prefix: str | Path) -> TokenStream:
        """Open ``prefix.bin`` with ``.idx`` (or an older ``.idx.npy``); CodesFileError unless they make one stream."""
        prefix = Path(prefix)
        json_path = Path(f"{prefix}.json")
        meta = read_json(json_path, TOKEN_STREAM, CodesFileError)
        for key, allowed in (("layout", LAYOUTS), ("dtype", TOKEN_DTYPES)):  # an odd dtype would map garbage
            if meta[key] not in allowed:
                raise CodesFileError(f"{json_path}: {key} {meta[key]!r} is not one of {', '.join(allowed)}")
        idx_path = Path(f"{prefix}.idx")
        if idx_path.is_file():
            dtype, index = read_megatron_index(idx_path)
            if dtype != meta["dtype"]:
                raise CodesFileError(f"{idx_path}: dtype {dtype}, {json_path.name} says {meta['dtype']}")
        else:
            idx_path = Path(f"{prefix}.idx.npy")  # earlier versions: (N + 1,) token offsets from 0
            try:
                index = np.load(idx_path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CodesFileError(f"{idx_path}: not a readable index ({str(exc).splitlines()[0][:120]})") from None
            bad = index.ndim != 1 or index.dtype.kind not in "iu" or index[:1].tolist() != [0]
            if bad or (np.diff(index) < 0).any():
                raise CodesFileError(f"{idx_path}: not an increasing list of token offsets from 0")
            index = index.astype(np.int64)
        expected = [meta["n_q"] * f["frames"] for f in meta["files"]]
        if len(index) != len(expected) + 1 or np.diff(index).tolist() != expected:
            raise CodesFileError(f"{idx_path}: {len(index) - 1} sequences that are not the {len(expected)} files of "
                                 "n_q x frames tokens the .json lists")  # fmt: skip
        bin_path, dtype = Path(f"{prefix}.bin"), np.dtype(meta["dtype"]).newbyteorder("<")
        if bin_path.stat().st_size != int(index[-1]) * dtype.itemsize:
            raise CodesFileError(f"{bin_path}: {bin_path.stat().st_size} bytes, not the {int(index[-1])} "
                                 f"{meta['dtype']} tokens of its index")  # fmt: skip
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if index[-1] else np.zeros(0, dtype)  # empty: no map
        return TokenStream(tokens, index, meta)

    def __len__(self) -> int:
        return len(self.index) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.index[i] : self.index[i + 1]])

    def codes(self, i: int) -> torch.Tensor:
        """File ``i`` as a ``LongTensor`` (n_q, frames), offsets removed."""
        m = self.meta
        return torch.from_numpy(unflatten(self[i], m["layout"], m["n_q"], m["bins"], m["offsets"]))


def parse_args(argv: list[str] | None = None):
    p = argument_parser(__doc__.split("\n")[0])
    p.prog = "python -m corpus.tokens"
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write PREFIX.bin / .idx (Megatron) / .json from a tokenized corpus",
                        formatter_class=p.formatter_class)  # fmt: skip
    ex.add_argument("corpus", type=Path, help="a --codes-out directory (npy, parquet, webdataset), a shard or a .npy"),
    ex.add_argument("prefix", type=Path, help="output prefix")
    ex.add_argument("--layout", choices=LAYOUTS, default="frame-major", help="token order within a file")
    ex.add_argument("--offsets", action="store_true", help="token = k * bins + code (one vocabulary for all codebooks)")
    ex.add_argument("--bins", type=int, help=f"codebook size of files that record none (default {DEFAULT_BINS})")
    ck = sub.add_parser("check", help="open a stream and decode every file back to codes",
                        formatter_class=p.formatter_class)  # fmt: skip
    ck.add_argument("prefix", type=Path)
    args = p.parse_args(argv)
    if getattr(args, "bins", None) is not None and args.bins < 1:
        p.error(f"--bins must be positive, got {args.bins}")
    return args


def run(args) -> int:
    if args.command == "export":
        meta = export_stream(args.corpus, args.prefix, args.layout, args.offsets, args.bins)
        files = len(meta["files"])
        print(f"wrote {args.prefix}.bin ({meta['tokens']} {meta['dtype']} tokens of {files} file(s)), .idx, .json")
    else:
        stream = TokenStream.open(args.prefix)
        for i in range(len(stream)):
            stream.codes(i)
        print(f"{len(stream)} file(s), {len(stream.tokens)} tokens, layout {stream.meta['layout']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(parse_args, run, argv, one_line=(CodesFileError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
