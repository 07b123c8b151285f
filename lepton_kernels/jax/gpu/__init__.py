"""Pallas Mosaic GPU kernels (Hopper, sm_90a) behind ``backend="gpu"`` of the JAX ops.

Importing this package never imports Mosaic GPU: it is loaded on first use, so that CPU and
TPU installs of jax keep working (see ``_mosaic`` for the reasons a call falls back).
"""
from .flash_attention import DEFAULT_CONFIGS, GpuFlashConfig, flash_attention_gpu
from .paged_attention import GpuPagedConfig, paged_attention_gpu
from .quant_matmul import GpuQuantConfig, quant_matmul_gpu

__all__ = ["DEFAULT_CONFIGS", "GpuFlashConfig", "GpuPagedConfig", "GpuQuantConfig", "flash_attention_gpu",
           "paged_attention_gpu", "quant_matmul_gpu"]
