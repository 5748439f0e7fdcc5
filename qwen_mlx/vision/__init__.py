"""Vision: image/video processors, ViT towers and M-RoPE position ids for the VL families."""
