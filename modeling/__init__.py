"""The model files copied verbatim into every ShortV checkpoint (they import only torch and transformers)."""
