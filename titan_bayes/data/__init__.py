"""Datasets, dataloaders and tokenizers (owned by the data work: issues 4 §5 and 5)."""
