"""The memory techniques. Each module holds one frozen config piece and one `apply_*` function.

Nothing here knows about Trainer, accelerate or the CLI; adapters translate recipes into those.
"""
