"""The pictures a run learns from: intake (files, folders, zips, URLs), the one decoder and suffix list, the dataset with its captions, and the per-step training batches."""
