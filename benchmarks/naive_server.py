"""The naive baseline: the classifier server a user would hack together with FastAPI and PEFT.

One ``peft.PeftModel`` per adapter (each on its own copy of the base encoder), loaded with
``PeftModel.from_pretrained`` from the same checkpoint folder the service serves; one forward
per request, no batching across requests, no routing (every LoRA module always runs). It
answers the same ``POST /classify`` request and response shape as the service so the same
load test runs against both::

    python -m benchmarks.naive_server --model-dir models/sst2 --port 8001

``--model-dir`` is either one checkpoint folder (the adapter is named after the folder) or a
model repository whose sub-folders are checkpoints (each is loaded separately).
"""

from __future__ import annotations

import argparse
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from cogalora import resolve_base_model
from cogalora.checkpoint import CONFIG_FILE


@dataclass
class NaiveAdapter:
    name: str
    model: Any
    tokenizer: Any
    labels: list[str]
    max_length: int
    modules: list[str]
    base_model: str
    lock: threading.Lock


class ClassifyRequest(BaseModel):
    inputs: str | list[str]
    adapter: str | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    truncate: bool = True


def checkpoint_dirs(model_dir: Path) -> list[Path]:
    """The checkpoint folders under ``model_dir`` (itself when it is one)."""
    if (model_dir / CONFIG_FILE).is_file():
        return [model_dir]
    found = sorted(path for path in model_dir.iterdir() if (path / CONFIG_FILE).is_file())
    if not found:
        raise SystemExit(f"{model_dir}: no {CONFIG_FILE} in it or in any sub-folder")
    return found


def load_adapter(directory: Path) -> NaiveAdapter:
    """What the PEFT documentation suggests: base model with a head, then ``PeftModel.from_pretrained``."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # The base checkpoint has no classifier; its "newly initialized" report is noise (PEFT loads the head).
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    meta = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    labels = list(meta["labels"])
    base_path = resolve_base_model(meta["base_model"])
    base = AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=len(labels), trust_remote_code=False, use_safetensors=True
    )
    model = PeftModel.from_pretrained(base, str(directory), is_trainable=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=False)
    return NaiveAdapter(
        name=directory.name,
        model=model,
        tokenizer=tokenizer,
        labels=labels,
        max_length=int(meta.get("max_length", 512)),
        modules=list(meta.get("sites") or []),
        base_model=meta["base_model"],
        lock=threading.Lock(),
    )


def _error(status: int, message: str, error_type: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "error_type": error_type})


def create_app(adapters: dict[str, NaiveAdapter]) -> FastAPI:
    app = FastAPI(title="naive PEFT classifier (baseline)")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/adapters")
    def list_adapters() -> dict[str, Any]:
        return {
            "adapters": [
                {"name": a.name, "base_model": a.base_model, "labels": a.labels, "method": "lora (peft)"}
                for a in adapters.values()
            ]
        }

    @app.post("/classify")
    def classify(request: ClassifyRequest):  # a plain def: FastAPI runs it in its thread pool
        name = request.adapter
        if name is None:
            if len(adapters) != 1:
                return _error(422, "several adapters are loaded: name one in 'adapter'", "adapter_required")
            name = next(iter(adapters))
        adapter = adapters.get(name)
        if adapter is None:
            return _error(404, f"unknown adapter {name!r}", "unknown_adapter")
        texts = [request.inputs] if isinstance(request.inputs, str) else list(request.inputs)
        if not texts:
            return _error(422, "'inputs' is empty", "invalid_request")
        encoded = adapter.tokenizer(
            texts, padding=True, truncation=True, max_length=adapter.max_length, return_tensors="pt"
        )
        # PEFT models are not documented as thread-safe; one forward at a time per model.
        with adapter.lock, torch.inference_mode():
            logits = adapter.model(**encoded).logits
        probs = torch.softmax(logits.float(), dim=-1)
        tokens = encoded["attention_mask"].sum(dim=1).tolist()
        results = []
        for row, count in zip(probs.tolist(), tokens, strict=True):
            ranked = sorted(zip(adapter.labels, row, strict=True), key=lambda item: item[1], reverse=True)
            results.append(
                {
                    "label": ranked[0][0],
                    "score": ranked[0][1],
                    "scores": [{"label": label, "score": score} for label, score in ranked],
                    "active_adapters": len(adapter.modules),
                    "total_adapters": len(adapter.modules),
                    "active_modules": adapter.modules,
                    "tokens": int(count),
                }
            )
        return {"adapter": name, "results": results}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.naive_server", description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/sst2"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    import uvicorn

    adapters = {path.name: load_adapter(path) for path in checkpoint_dirs(args.model_dir)}
    uvicorn.run(create_app(adapters), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
