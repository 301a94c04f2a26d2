"""What leaves the run folder: single-file and LoRA exports, kohya names, merges, the report and model card, file hashes."""
