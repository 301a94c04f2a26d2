"""The scorers: one interface (base) and its implementations (CLIP, CCIP, the tiny world's pixel analysis)."""

# score_with values accepted but never offered to users (the notebooks' form and parameters cell):
# `world` reads only the tiny demo world's drawn characters (dbnb demo and the tests name it).
DEMO_ONLY = ("world",)
