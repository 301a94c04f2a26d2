"""The models: what each base family (SD 1.x today) is and how it loads, keys its single files and renders, plus what works on any family's components (LoRA adapters, rendering pictures)."""
