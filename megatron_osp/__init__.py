"""megatron-osp: Outlier-Safe Pre-Training (Muon + SSNorm + EmbProj) on NVIDIA Megatron-Core."""

__version__ = "0.1.0"
