from .core_vq import EuclideanCodebook, ResidualVectorQuantization, VectorQuantization, kmeans
from .usage import CodebookUsage, codebook_stats
from .vq import QuantizedResult, ResidualVectorQuantizer

__all__ = [
    "CodebookUsage",
    "EuclideanCodebook",
    "QuantizedResult",
    "ResidualVectorQuantization",
    "ResidualVectorQuantizer",
    "VectorQuantization",
    "codebook_stats",
    "kmeans",
]
