"""Convert X-Codec and X-Codec 2 checkpoints between formats, bit for bit: ``python -m models.convert SRC DST [--to FORMAT]``.

SRC is anything ``models.load_codec`` reads (X-Codec 2: its pip or Lightning layout to transformers'); DST (absent, empty, or ``--overwrite``) is written atomically
and loaded back to compare every tensor (``--no-verify`` skips it).
"""

import argparse
import re
from pathlib import Path

import torch
from transformers import Xcodec2Model, XcodecModel

from utils.cli import argument_parser, cli_main
from utils.files import atomic_directory

from .export import transformers_model, write_export
from .pretrained import CheckpointError, adapt_weight_norm, load_codec_state, read_checkpoint
from .xcodec import XCodec, build_codec
from .xcodec2 import XCodec2
from .xcodec2_layout import Codec2Config

FORMATS = ("transformers", "export")


class ConvertError(Exception):
    """A conversion that cannot be done; the message says why in one line."""


def verify(src, config, dst: Path, fmt: str, cls=XCodec) -> None:
    """Require every tensor of SRC and DST loaded to be identical (and transformers to read DST cleanly)."""
    sa, sb = cls.from_pretrained(src, config=config).state_dict(), cls.from_pretrained(dst).state_dict()
    differ = sorted(set(sa) ^ set(sb)) or [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    if differ:
        raise ConvertError(f"verification failed: {len(differ)} tensor(s) differ after conversion, e.g. {differ[0]}")
    if fmt == "transformers":
        _, info = (Xcodec2Model if cls is XCodec2 else XcodecModel).from_pretrained(str(dst), output_loading_info=True)
        bad = [k for part in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in info.get(part, [])]
        if bad:
            raise ConvertError(f"verification failed: transformers XcodecModel does not load {dst} cleanly ({bad[0]} ...)")


def convert(src: str | Path, dst: str | Path, to: str | None = None, config: str | Path | None = None,
            overwrite: bool = False, check: bool = True) -> tuple[Path, str]:  # fmt: skip
    """Convert ``src`` into ``dst`` (see the module docstring); returns ``(dst, format)``."""
    contents = read_checkpoint(src, config)
    fmt = to or ("export" if contents.kind == "transformers" else "transformers")
    if fmt not in FORMATS:
        raise ConvertError(f"unknown target format {fmt!r}; expected one of {', '.join(FORMATS)}")
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise ConvertError(f"{dst}: directory is not empty; pass --overwrite to replace it")
    inside = [Path(p) for p in (src, config) if p is not None and Path(p).exists() and Path(p).resolve().is_relative_to(dst.resolve())]
    if inside:  # replacing dst would delete what is being converted
        raise ConvertError(f"{inside[0]} is inside the destination {dst}, which is replaced: choose another destination")
    gen, scale = contents.generator, contents.audio_norm_scale
    if isinstance(gen, Codec2Config):  # X-Codec 2: to transformers' Xcodec2Model format (the pip and .ckpt layouts)
        if fmt != "transformers":
            raise ConvertError("X-Codec 2 converts to the transformers format only (--to transformers)")
        model = XCodec2.from_checkpoint(contents)
        atomic_directory(dst, lambda tmp: (model.save_pretrained(tmp), check and verify(src, config, tmp, fmt, XCodec2)))
        return dst, fmt
    # Checked against the architecture, acoustic weight norm folded as the loader folds it; the teacher's
    # positional conv stays weight-normed (transformers expects it, and the loader folds it as it would have).
    skeleton = build_codec(gen, scale, weight_norm=False)
    load_codec_state(skeleton, contents.state, str(src))
    pos_conv = "pos_conv_embed.conv.parametrizations.weight.original0"
    keys = {re.sub(r"pos_conv_embed\.conv\.weight$", pos_conv, k) for k in skeleton.state_dict()}
    state = {k: v.detach().clone().contiguous() for k, v in adapt_weight_norm(contents.state, keys).items()}

    def write(tmp: Path) -> None:
        if fmt == "transformers":
            transformers_model(state, gen, scale).save_pretrained(str(tmp))
        else:
            write_export(state, gen, scale, tmp)
        if check:
            verify(src, config, tmp, fmt)

    atomic_directory(dst, write)
    return dst, fmt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser("Convert X-Codec checkpoints: release .pth / training checkpoint / transformers dir / export "
                        "-> transformers XcodecModel directory or our export.")  # fmt: skip
    p.prog = "python -m models.convert"
    p.add_argument("src", help="release name, .pth (release or training checkpoint), transformers dir, export dir or .safetensors")
    p.add_argument("dst", type=Path, help="output directory")
    p.add_argument("--to", choices=FORMATS, help="output format (default: export for a transformers source, else transformers)")
    p.add_argument("--config", type=Path, help="YAML for a release .pth (default: config.yaml beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-verify", action="store_true", help="skip loading the result back and comparing every tensor")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    dst, fmt = convert(args.src, args.dst, args.to, args.config, args.overwrite, not args.no_verify)
    checked = "" if args.no_verify else " (verified: every tensor identical when loaded)"
    print(f"wrote {fmt} checkpoint {dst}{checked}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(parse_args, run, argv, (CheckpointError, ConvertError))


if __name__ == "__main__":
    raise SystemExit(main())
