from .vq import CodebookUsage, EuclideanCodebook, QuantizedResult, ResidualVectorQuantizer, kmeans

__all__ = ["CodebookUsage", "EuclideanCodebook", "QuantizedResult", "ResidualVectorQuantizer", "kmeans"]
