"""Layer 2, vision: datasets, the model zoo, fine-tuning and pruning (PyTorch). Imports only ``core``."""
