"""Model loading (HF directories, safetensors, GGUF) and the model architectures."""
