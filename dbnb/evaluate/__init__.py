"""Judging a run: test images rendered for each checkpoint and the scores that compare them."""
