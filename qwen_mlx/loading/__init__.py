"""Loading checkpoints: HF directories, converted directories and GGUF files."""
