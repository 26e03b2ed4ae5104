"""The OpenAI-compatible server: request parsing (`protocol`), output parsing (`parsers`: reasoning and
tool calls), per-choice outputs (`outputs`), the scheduler's worker thread (`service`), metrics, and the
FastAPI application (`app`). `python serve.py --checkpoint PATH --port 8000` runs it (`main`)."""
