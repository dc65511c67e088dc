"""Process-wide runtime: the background event loop and bounded offload pools."""
