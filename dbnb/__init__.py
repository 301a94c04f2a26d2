"""dbnb — DreamBooth for Stable Diffusion 1.x, as notebooks and a small library.

Data flows one way: config → dataset prep → class images → train → run folder → samples /
scores / export. See README.md for the module map.
"""

__version__ = "0.1.0"
