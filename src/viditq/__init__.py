"""viditq: post-training quantization for diffusion transformers."""
