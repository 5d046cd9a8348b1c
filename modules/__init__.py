from .acoustic import AcousticDecoder, AcousticEncoder, Snake1d, conv_out_length, length_mask
from .semantic import SemanticDecoder, SemanticEncoder
from .teacher import TEACHERS, Teacher, build_teacher

__all__ = [
    "TEACHERS",
    "AcousticDecoder",
    "AcousticEncoder",
    "SemanticDecoder",
    "SemanticEncoder",
    "Snake1d",
    "Teacher",
    "build_teacher",
    "conv_out_length",
    "length_mask",
]
