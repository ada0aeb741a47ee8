"""GGUF models: read as Hugging Face checkpoints (`read.GGUFCheckpoint`)."""
from lazymerge.io.gguf.files import gguf_files, is_gguf_model
from lazymerge.io.gguf.read import GGUFCheckpoint

__all__ = ["GGUFCheckpoint", "gguf_files", "is_gguf_model"]
