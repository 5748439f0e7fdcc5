"""Model families. See `qwen_mlx.registry` for the model_type -> module table."""
