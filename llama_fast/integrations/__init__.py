"""Bridges to other libraries, each imported on its own (`import llama_fast.integrations.transformers`)."""
