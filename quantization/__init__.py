from .usage import CodebookUsage
from .vq import EuclideanCodebook, QuantizedResult, ResidualVectorQuantizer, kmeans

__all__ = ["CodebookUsage", "EuclideanCodebook", "QuantizedResult", "ResidualVectorQuantizer", "kmeans"]
