"""The X-Codec model: the module, its one factory, checkpoint reading and writing, long files and streaming."""

from .codebooks import init_codebooks
from .config import GeneratorConfig, load_generator_config
from .pretrained import CheckpointError, checkpoint_id
from .xcodec import CodecOutput, CodesError, XCodec, build_codec

__all__ = ["CheckpointError", "CodecOutput", "CodesError", "GeneratorConfig", "XCodec", "build_codec", "checkpoint_id",
           "init_codebooks", "load_generator_config"]  # fmt: skip
