"""YuE fine-tuning input from songs (docs/yue.md): stems and mix tokenized with YuE's codec by ``inference.py``
into the resumable npy corpus ``yue/npy``, and the JSONL YuE reads, ``yue/jsonl/NAME.jsonl``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import soundfile as sf

import inference
from corpus.codes import read_manifest
from corpus.inputs import scan_directory
from corpus.schema import Field, problem, read_json, write_json
from utils import distributed as du
from utils.audio import audio_extensions
from utils.cli import EXIT_ERROR, EXIT_OK, EXIT_SOME_FAILED, CliError, argument_parser, cli_main
from utils.files import atomic_write

YUE_CODEC = "yue_xcodec_mini"
YUE_KBPS = 6.0  # all 12 of YuE's codebooks: stage 1 reads exactly 12 rows (or 1), stage 2 rows 0-7
YUE_CODEBOOKS = 12
YUE_FPS = 50
ROLES = {"vocals": "Vocals", "instrumental": "Instrumental"}  # stem suffix -> the name YuE's example files use


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser("Turn songs (vocal + instrumental stems, optional mix and text) into YuE's fine-tuning input.")
    p.add_argument("songs", type=Path, help="directory of S.vocals.*, S.instrumental.*, optional S.<audio> mix, S.json")
    p.add_argument("out", type=Path, help="output directory: npy/ (codes), jsonl/NAME.jsonl, mix/, stems.jsonl")
    p.add_argument("--name", default="songs", help="the JSONL's name (YuE's preprocess_data.sh NAME_PREFIX)")
    p.add_argument("--checkpoint", default=YUE_CODEC, help="YuE's codec (a release name or a local copy of its files)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="clips per forward pass")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if "/" in args.name or not args.name.strip():
        p.error(f"--name {args.name!r}: a file name, no directories")
    return args


def find_songs(songs: Path, out: Path) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """``({song: {"vocals"|"instrumental"|"mix": file}}, problems)``, a song the path without role and extension."""
    found: dict[str, dict[str, Path]] = {}
    problems = []
    for f in scan_directory(songs, audio_extensions(), exclude=[out]):
        stem = f.relative_to(songs).with_suffix("").as_posix()
        head, _, tail = stem.rpartition(".")
        role = tail.lower() if head and tail.lower() in ROLES else "mix"
        song = head if role != "mix" else stem
        if role in found.setdefault(song, {}):
            problems.append(f"{f}: a second {role} of song {song} (also {found[song][role]})")
            found[song]["duplicate"] = f
        found[song][role] = f
    for song, files in list(found.items()):
        missing = [r for r in ROLES if r not in files]
        if missing:
            stems = " and no ".join(missing)
            problems.append(f"{songs / song}: no {stems} stem (S.vocals.* and S.instrumental.* needed)")
        if missing or "duplicate" in files:
            del found[song]
    return found, problems


def write_mix(files: dict[str, Path], target: Path) -> Path:
    """The stems' sum as a float WAV (no clipping), rewritten only when a stem is newer (a rerun resumes)."""
    if target.is_file() and all(target.stat().st_mtime_ns >= f.stat().st_mtime_ns for f in files.values()):
        return target
    (vocals, rate), (instrumental, _) = (sf.read(str(files[r]), dtype="float32", always_2d=True) for r in ROLES)
    mix = vocals.mean(axis=1) + instrumental.mean(axis=1)
    return atomic_write(target, lambda tmp: sf.write(tmp, mix, rate, subtype="FLOAT", format="WAV"))


def read_text(path: Path) -> dict:
    """``S.json``: ``genres`` (str or list), ``msa`` and ``lyrics`` (segments in seconds); ValueError otherwise."""
    if not path.is_file():
        return {}
    text = read_json(path, {})
    genres = text.get("genres", "")
    if isinstance(genres, list) and all(isinstance(g, str) for g in genres):
        genres = ", ".join(genres)
    if not isinstance(genres, str):
        raise ValueError(f"{path}: genres must be a string or a list of strings")

    def segments(key: str, label: str) -> list[dict]:
        rows = text.get(key, [])
        schema = {"start": Field(float, True, ge=0), "end": Field(float, True), label: Field(str, True)}
        if not isinstance(rows, list) or any(problem(r, schema) or r["start"] >= r["end"] for r in rows):
            raise ValueError(f"{path}: {key} must be a list of {{start, end, {label}}} with 0 <= start < end (seconds)")
        return rows

    return {"genres": genres, "msa": segments("msa", "label"), "lyrics": segments("lyrics", "text")}


def yue_line(song: str, codes: dict[str, dict], root: Path, text: dict) -> dict:
    """One JSONL line in YuE's format from the manifest entries of a song's codes (``root``: the npy corpus)."""
    frames = codes["vocals"]["frames"]
    seconds = codes["vocals"]["samples"] / codes["vocals"]["sample_rate"]
    lyrics = [{"offset": r["start"], "duration": round(r["end"] - r["start"], 6),
               "codec_frame_start": min(int(r["start"] * YUE_FPS), frames),
               "codec_frame_end": min(int(r["end"] * YUE_FPS), frames), "line_content": r["text"]}
              for r in text.get("lyrics", [])]  # fmt: skip
    paths = {f"{role}_codec": str((root / e["codes"]).resolve()) for role, e in codes.items()}
    return {"id": song, "codec": paths["mix_codec"], "vocals_codec": paths["vocals_codec"],
            "instrumental_codec": paths["instrumental_codec"], "audio_length_in_sec": seconds,
            "msa": [{"start": r["start"], "end": r["end"], "label": r["label"]} for r in text.get("msa", [])],
            "genres": text.get("genres", ""), "splitted_lyrics": {"segmented_lyrics": lyrics}}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if not args.songs.is_dir():
        raise CliError(f"{args.songs}: not a directory of songs")
    songs, problems = find_songs(args.songs, args.out)
    texts, stems, names = {}, [], {}  # names: song -> role -> the file's name in the corpus (its id + extension)
    for song, files in sorted(songs.items()):
        try:
            shapes = {role: (i.samplerate, i.frames) for role, i in ((r, sf.info(str(f))) for r, f in files.items())}
            if len(set(shapes.values())) > 1:  # YuE pairs the stems (and the mix) frame by frame
                said = ", ".join(f"{role} {n} samples at {rate} Hz" for role, (rate, n) in shapes.items())
                raise ValueError(f"{song}: stems differ in sample rate or length ({said})")
            texts[song] = read_text(args.songs / f"{song}.json")
        except (ValueError, RuntimeError) as exc:  # RuntimeError: soundfile cannot read a header
            problems.append(str(exc))
            continue
        if "mix" not in files:
            files["mix"] = write_mix(files, args.out / "mix" / f"{song}.wav")
        for role, f in sorted(files.items()):
            stems.append({"path": str(f.resolve()), "id": song + (f".{ROLES[role]}" if role in ROLES else "")})
            names.setdefault(song, {})[role] = stems[-1]["id"] + f.suffix
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if not stems:
        raise CliError(f"{args.songs}: no song with both stems to tokenize")
    listing = write_json(args.out / "stems.jsonl", stems)  # the tokenization's input: its path is the input root
    argv = ["--input", str(listing), "--codes-out", str(args.out / "npy"), "--checkpoint", args.checkpoint, "-b",
            str(YUE_KBPS), "--batch-size", str(args.batch_size)] + (["--device", args.device] if args.device else [])
    code = inference.main(argv)
    if code == EXIT_ERROR:
        return code
    if du.rank_and_world_size()[0] != 0:
        return code  # rank 0 writes the JSONL (rerun with one process when every rank is done)
    by_name = {e["path"]: e for e in read_manifest(args.out / "npy")}  # a corrupt manifest: one line (a ValueError)
    lines, empty = [], {"lyrics": 0, "msa": 0, "genres": 0}
    for song in sorted(texts):
        entries = {role: by_name.get(name) for role, name in names[song].items()}
        if any(e is None for e in entries.values()):
            continue  # not tokenized: inference reported why
        n_q, frames = ({e[key] for e in entries.values()} for key in ("n_q", "frames"))
        if n_q != {YUE_CODEBOOKS} or len(frames) != 1:
            raise CliError(f"{song}: codes of {sorted(n_q)} codebooks, frames {sorted(frames)}; YuE needs "
                           f"{YUE_CODEBOOKS} codebooks, one length")  # fmt: skip
        lines.append(yue_line(song, entries, args.out / "npy", texts[song]))
        for key in empty:
            empty[key] += not texts[song].get(key)
    target = write_json(args.out / "jsonl" / f"{args.name}.jsonl", lines)
    print(f"wrote {target}: {len(lines)} song(s), {len(problems)} problem(s) above; without lyrics "
          f"{empty['lyrics']} (YuE's stage-1 preprocessing skips those), without msa {empty['msa']}, without genres "
          f"{empty['genres']}", file=sys.stderr)  # fmt: skip
    return EXIT_SOME_FAILED if problems or code != EXIT_OK or len(lines) < len(texts) else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return cli_main(parse_args, run, argv, one_line=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
