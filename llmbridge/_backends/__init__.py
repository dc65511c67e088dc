"""Adapters to real engines: batching, OpenAI HTTP, transformers, ExLlamaV2, llama.cpp."""
