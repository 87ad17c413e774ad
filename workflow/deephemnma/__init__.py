"""DeepHEMNMA: normal-mode analysis of continuous conformational heterogeneity in cryo-EM images."""

__version__ = "0.1.0"
