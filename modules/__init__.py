from .acoustic import AcousticDecoder, AcousticEncoder, Snake1d, conv_out_length, length_mask
from .semantic import SemanticDecoder, SemanticEncoder
from .teacher import TEACHERS, MaskedGroupNorm, build_teacher, teacher_features, teacher_frames

__all__ = [
    "TEACHERS",
    "AcousticDecoder",
    "AcousticEncoder",
    "MaskedGroupNorm",
    "SemanticDecoder",
    "SemanticEncoder",
    "Snake1d",
    "build_teacher",
    "conv_out_length",
    "length_mask",
    "teacher_features",
    "teacher_frames",
]
