"""CoGaLoRA Serve: the HTTP service (FastAPI app, batcher, engine, model repository, metrics)."""
