"""dbnb — DreamBooth for Stable Diffusion 1.x, as notebooks and a small library.

Data flows one way: config → dataset prep → class images → train → run folder → samples /
scores / export. Each step is a folder, its job in its __init__ docstring; README.md's "Layout"
section draws them and the direction of their imports.
"""

__version__ = "0.1.0"
