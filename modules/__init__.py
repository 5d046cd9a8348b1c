from .acoustic import AcousticDecoder, AcousticEncoder
from .semantic import SemanticDecoder, SemanticEncoder
from .teacher import TEACHERS, Teacher, build_teacher

__all__ = ["TEACHERS", "AcousticDecoder", "AcousticEncoder", "SemanticDecoder", "SemanticEncoder", "Teacher"]
__all__ += ["build_teacher"]
