"""The HTTP service behind tools/serve.py: the request checks, the job queue, the API and its page (FastAPI)."""
