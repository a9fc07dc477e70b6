"""Fine-tuning and evaluation of the FP32 model."""
