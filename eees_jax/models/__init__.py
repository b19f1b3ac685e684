"""Flax CLIP towers (and their construction from configs), the EEES network, the tokenizer."""
