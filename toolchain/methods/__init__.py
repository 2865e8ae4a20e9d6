"""Compression methods. Each turns a trained model into a compressed one in PyTorch."""
