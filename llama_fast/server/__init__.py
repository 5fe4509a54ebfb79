"""The OpenAI-compatible HTTP server behind `llama-fast serve` (docs/server.md): app.py the FastAPI app and
its routes, protocol.py the request bodies and errors, responses.py the response bodies, metrics.py the
Prometheus metrics."""
