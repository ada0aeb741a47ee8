"""Running a checkpoint's transformers modules one decoder layer at a time (layer streaming)."""
