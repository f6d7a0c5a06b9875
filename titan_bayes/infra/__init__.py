"""Parallelism plans (FSDP2, tensor parallel, activation checkpointing, compile, pipeline)."""
