"""viditq: post-training quantization (W8A8 / W4A8 / W4A4) for diffusion transformers.

    calib = viditq.capture_calibration(pipe, prompts, num_inference_steps=20)
    viditq.quantize(pipe.transformer, "w4a8", calib=calib)
    viditq.save_quantized(pipe.transformer, "out/pixart-w4a8")
    transformer = viditq.load_quantized("out/pixart-w4a8")
"""
from .calibrate import capture_calibration
from .checkpoint import load_pipeline, load_quantized, save_quantized
from .compile import compile_blocks
from .config import PRESETS, ActSpec, BalanceSpec, LayerRule, QuantConfig, WeightSpec
from .layers import QuantLinear
from .memory import MemoryReport, memory_report
from .pipeline import quantize_pipeline, quantize_weights_only
from .quantize import quantize

__version__ = "0.1.0"
__all__ = [
    "ActSpec", "BalanceSpec", "LayerRule", "MemoryReport", "PRESETS", "QuantConfig", "QuantLinear", "WeightSpec",
    "capture_calibration", "compile_blocks", "load_pipeline", "load_quantized", "memory_report", "quantize",
    "quantize_pipeline", "quantize_weights_only", "save_quantized",
]
