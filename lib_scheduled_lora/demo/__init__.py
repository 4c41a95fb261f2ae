"""Built-in demo: a tiny text-to-image world in which scheduled LoRA can be seen and measured.

See ``model.py`` (the model and pipeline), ``world.py`` (data), ``train.py`` (how the shipped
weights were made), ``metrics.py`` (colour and concept fidelity) and ``grid.py``.
"""
