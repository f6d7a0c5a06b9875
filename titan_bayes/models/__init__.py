"""Decoder language models built from Bayesian, Gated DeltaNet and attention layers."""
