"""Why PTQ fails: FP32 activation statistics, quantization-error attribution, figures."""
