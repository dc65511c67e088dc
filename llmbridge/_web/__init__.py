"""Web glue shared by the integrations: stream bodies, drain, the WSGI-to-ASGI adapter."""
