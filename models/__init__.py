from .builder import build_codec, frame_rate_of, num_quantizers_of
from .xcodec import CodecOutput, CodesError, XCodec

__all__ = ["CodecOutput", "CodesError", "XCodec", "build_codec", "frame_rate_of", "num_quantizers_of"]
