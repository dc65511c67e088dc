"""The OpenAI-compatible surface: wire parsing and shaping, and its routes."""
