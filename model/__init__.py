"""Qwen2-VL in plain PyTorch."""
