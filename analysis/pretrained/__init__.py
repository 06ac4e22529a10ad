"""Pretrained models: transformers checkpoints and GGUF files behind posleak's hook names."""
