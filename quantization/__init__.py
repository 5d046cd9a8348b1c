from .core_vq import EuclideanCodebook, ResidualVectorQuantization, VectorQuantization, kmeans
from .vq import QuantizedResult, ResidualVectorQuantizer

__all__ = [
    "EuclideanCodebook",
    "QuantizedResult",
    "ResidualVectorQuantization",
    "ResidualVectorQuantizer",
    "VectorQuantization",
    "kmeans",
]
