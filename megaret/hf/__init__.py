"""Hugging Face export (`python -m megaret.export --format hf|safetensors`): the state dict as a
transformers model (convert), the directory written (write), and the standalone modeling code
copied into it (modeling/, which imports torch and transformers only)."""
