"""Ray-distributed experiment platform for self-supervised vision pretraining."""

__version__ = "0.1.0"
