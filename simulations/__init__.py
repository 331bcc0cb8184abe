"""Flower simulation apps, datasets, models and task loops for mergenet-fl."""
