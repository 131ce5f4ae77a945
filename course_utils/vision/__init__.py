"""Layer 2, vision: datasets, the model zoo, fine-tuning, pruning, the deployed model (``deployment``) and
PyTorch inference (``inference``). Imports only ``core``."""
