"""One engine per host: the engine process's server and the workers' client.

:mod:`.server` serves a submitter (an engine, or a pipeline over one) on a Unix socket
under uvicorn; :mod:`.client` is the :class:`~llmbridge.Engine` a worker submits to,
whose backend forwards every request over that socket; :mod:`.process` starts and
supervises the engine process; :mod:`.wire` is what both ends agree on.
"""
