"""The OpenAI-compatible server: FastAPI app (app.py), request bodies (protocol.py), metrics, runner (serve.py)."""
