"""The scorers: one interface (base) and its implementations (CLIP, CCIP, the tiny world's pixel analysis)."""
