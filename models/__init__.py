"""The codecs (X-Codec, X-Codec 2): the modules, their factories, checkpoint reading and writing, long files and
streaming."""

from .codebooks import init_codebooks
from .codec import Codec, CodesError
from .config import GeneratorConfig, load_generator_config
from .pretrained import CheckpointError, checkpoint_id
from .xcodec import CodecOutput, XCodec, build_codec
from .xcodec2 import XCodec2, load_codec

__all__ = ["CheckpointError", "Codec", "CodecOutput", "CodesError", "GeneratorConfig", "XCodec", "XCodec2",
           "build_codec", "checkpoint_id", "load_codec", "init_codebooks", "load_generator_config"]  # fmt: skip
