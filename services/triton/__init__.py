"""Local Triton Inference Server launcher (the tritonserver of the nvidia-pytriton wheel)."""
