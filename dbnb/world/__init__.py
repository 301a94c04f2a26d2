"""The tiny world: the tiny models built in code and `dbnb demo`, which trains the pretrained world model in the package on a CPU."""
