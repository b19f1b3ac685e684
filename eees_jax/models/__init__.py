"""Flax CLIP towers, the EEES network, the tokenizer and CLIP weight import."""
