"""Evaluation metrics: image/text embedders (CLIP, DINO) and the metric definitions built on them.

Heavy libraries (torch, transformers, open_clip) are imported inside functions only.
"""
