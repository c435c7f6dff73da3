"""What a user would run instead: the bare encoder + head offline, in torch and in ONNX Runtime.

Every baseline classifies the same sentences in batches of 32, each batch padded to its longest
sentence (tokenization is not timed), and reports sentences per second:

- ``torch-float32`` / ``torch-bfloat16``: the Hugging Face model in eager mode;
- ``torch-int8-dynamic``: ``torch.ao.quantization.quantize_dynamic`` on its Linear layers (int8
  weights, one activation scale per batch: not batch invariant);
- ``onnxruntime-float32`` / ``onnxruntime-int8``: the model exported to ONNX, and that export
  quantized with ``onnxruntime.quantization.quantize_dynamic`` (int8 weights).

The baselines take turns for ``rounds`` rounds (one pass over the batches each) and each reports
the median of its rounds, so that a moment's noise on a shared machine does not land on whichever
baseline ran then. A machine whose speed drifts between minutes still moves the figures between
runs: compare ratios within one run.

ONNX Runtime is a benchmark-only dependency (``pip install -e '.[bench]'``); without it its rows are
skipped with a note.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

BATCH = 32
BATCHES = 10
#: Timed rounds per baseline (their median is reported).
ROUNDS = 5
BASELINES = ("torch-float32", "torch-bfloat16", "torch-int8-dynamic", "onnxruntime-float32", "onnxruntime-int8")


def _bare_model(model_dir: Path, adapter: str):
    """The base encoder with the adapter's own head (no LoRA), and its tokenizer and max_length."""
    from cogalora import load_base_model, load_tokenizer, read_adapter

    meta, weights = read_adapter(model_dir / adapter)
    model = load_base_model(meta.base_model, num_labels=len(meta.labels))
    with torch.no_grad():
        for path, (weight, bias) in weights.head.items():
            model.get_submodule(path).weight.copy_(weight)
            model.get_submodule(path).bias.copy_(bias)
    return model.eval(), load_tokenizer(meta.base_model), meta.max_length


def _rate(run: Callable[[dict], object], batches: list[dict]) -> float:
    """Sentences/s of one pass of ``run`` over ``batches``."""
    began = time.perf_counter()
    for batch in batches:
        run(batch)
    return sum(len(batch["input_ids"]) for batch in batches) / (time.perf_counter() - began)


def _median_rates(runs: dict[str, tuple[Callable[[dict], object], list[dict]]], rounds: int) -> dict[str, float]:
    """Each of ``runs`` (label -> run and its inputs), warmed up, then timed in turn for ``rounds`` rounds:
    the median of each label's rounds."""
    for run, inputs in runs.values():
        run(inputs[0])
    rates: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, (run, inputs) in runs.items():
            rates[label].append(_rate(run, inputs))
    return {label: statistics.median(values) for label, values in rates.items()}


def baseline_rates(
    model_dir: Path, adapter: str, sentences: list[str], threads: int = 2, rounds: int = ROUNDS
) -> dict[str, float]:
    """Sentences/s of every available baseline on the first ``BATCH * BATCHES`` sentences (median of ``rounds``)."""
    torch.set_num_threads(threads)
    model, tokenizer, max_length = _bare_model(model_dir, adapter)
    texts = sentences[: BATCH * BATCHES]
    batches = [
        dict(tokenizer(texts[i : i + BATCH], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for i in range(0, len(texts), BATCH)
    ]
    half = _bare_model(model_dir, adapter)[0].to(torch.bfloat16)
    dynamic = torch.ao.quantization.quantize_dynamic(
        _bare_model(model_dir, adapter)[0], {torch.nn.Linear}, dtype=torch.qint8
    )
    runs: dict[str, tuple[Callable[[dict], object], list[dict]]] = {
        "torch-float32": (lambda batch: model(**batch), batches),
        "torch-bfloat16": (lambda batch: half(**batch), batches),
        "torch-int8-dynamic": (lambda batch: dynamic(**batch), batches),
    }
    with tempfile.TemporaryDirectory() as scratch:
        runs.update(_onnx_runs(model, batches, threads, Path(scratch)))  # exported outside inference mode
        with torch.inference_mode():
            return _median_rates(runs, rounds)


def _onnx_runs(model, batches: list[dict], threads: int, scratch: Path) -> dict[str, tuple[Callable, list[dict]]]:
    """ONNX Runtime sessions of the model exported to ``scratch`` (float32, and int8 dynamic), with their feeds."""
    try:
        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        print("note: onnxruntime is not installed (pip install -e '.[bench]'); ONNX rows skipped", file=sys.stderr)
        return {}
    names = ["input_ids", "attention_mask", "token_type_ids"]
    exported, quantized = scratch / "model.onnx", scratch / "model-int8.onnx"
    example = tuple(batches[0][name] for name in names)
    axes = {name: {0: "batch", 1: "tokens"} for name in names} | {"logits": {0: "batch"}}
    torch.onnx.export(
        model,
        example,
        str(exported),
        input_names=names,
        output_names=["logits"],
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
    )
    quantize_dynamic(str(exported), str(quantized), weight_type=QuantType.QInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    feeds = [{name: batch[name].numpy() for name in names} for batch in batches]
    runs = {}
    for label, path in (("onnxruntime-float32", exported), ("onnxruntime-int8", quantized)):
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        runs[label] = (lambda feed, session=session: session.run(None, feed), feeds)
    return runs


if __name__ == "__main__":
    from benchmarks.serving import DEFAULT_DATA, ROOT, read_sentences

    for name, rate in baseline_rates(ROOT / "models", "sst2", read_sentences(DEFAULT_DATA, 320)).items():
        print(f"{name:22s} {rate:7.1f} sentences/s")
