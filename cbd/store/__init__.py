"""Models on disk and on the Hub: anchors of a chain, Hugging Face checkpoint folders, pushes."""
