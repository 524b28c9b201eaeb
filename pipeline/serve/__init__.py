"""Serving: one base model and many PEFT adapters on it, over OpenAI's completions API.

catalog.py holds the models (the base once, each adapter selectable by name), openai_api.py checks
requests and shapes answers, http.py serves them; `python -m pipeline.serve` runs it from folders.

    catalog = load_catalog(Path("base"), {"support": Path("support/model")})
    serve(catalog, "127.0.0.1", 8000)     # OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
"""

from pipeline.serve.catalog import Catalog, Completion, RequestRejected, UnknownModel, load_catalog, template_formatter
from pipeline.serve.http import make_server, serve

__all__ = ["Catalog", "Completion", "RequestRejected", "UnknownModel", "load_catalog", "template_formatter",
           "make_server", "serve"]
