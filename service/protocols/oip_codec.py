"""The Open Inference Protocol v2 on the wire: its JSON schemas, Triton's binary tensors, and the
translation of an infer request into texts and options, and of the answer into output tensors.

An infer request carries one BYTES tensor of texts, any name, shape ``[n]`` (``[n, 1]`` is accepted
too); the answer has ``label`` (BYTES ``[n]``), ``score`` (FP32 ``[n]``), ``scores`` (FP32
``[n, labels]``, in the label order of the model metadata) and the routing facts of every row
(:data:`OUTPUTS`). A request may name the outputs it wants. Request ``parameters``: ``truncate``,
``threshold`` and Triton's ``binary_data_output``; anything else is a 422. Triton's binary tensor
data extension (what ``tritonclient.http`` sends by default) is decoded by :class:`BinaryTensorRoute`
into the JSON form before validation, and outputs are encoded in binary when the request asks for it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from service.classification import Classified
from service.errors import InvalidRequestError
from service.schemas import RowResult

#: Triton's binary tensor data extension: the length of the JSON part of a binary body.
HEADER_LENGTH = "Inference-Header-Content-Length"
PLATFORM = "cogalora"


# ---- wire schemas ----------------------------------------------------------------------------------


class InferInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256, description="Any name.")
    shape: list[int] = Field(description="[n] (or [n, 1]): n texts.")
    datatype: str = Field(description="BYTES.")
    parameters: dict[str, Any] | None = Field(None, description="Only binary_data_size (binary extension).")
    data: list[Any] | None = Field(None, description="n UTF-8 strings (row-major; may be nested).")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=256)
    parameters: dict[str, Any] | None = Field(None, description="Only binary_data (bool).")


class InferRequestBody(BaseModel):
    """``POST /v2/models/{adapter}/infer``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a fine film", "dull"]}]}
            ]
        },
    )

    id: str | None = Field(None, max_length=256, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(None, description="truncate (bool), threshold (0-1), binary_data_output.")
    inputs: list[InferInput] = Field(description="Exactly one BYTES tensor of texts.")
    outputs: list[RequestedOutput] | None = Field(None, description="Outputs to return (default: all).")


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[OutputTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    labels: list[str] = Field(description="Label names, in the column order of the scores output.")
    parameters: dict[str, Any] = Field(default_factory=dict, description="base_model, method, tau, max_length, ...")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


# ---- outputs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    datatype: Literal["BYTES", "FP32", "FP64", "INT32", "BOOL"]
    value: Callable[[RowResult, list[str]], Any]
    """One row's value (a list for a per-label output); ``labels`` in the adapter's order."""
    per_label: bool = False


def _scores_in_label_order(row: RowResult, labels: list[str]) -> list[float]:
    by_label = {entry.label: entry.score for entry in row.scores}
    return [by_label[label] for label in labels]


#: Every output an infer answer can carry, in answer order.
OUTPUTS: dict[str, Output] = {
    "label": Output("BYTES", lambda row, _: row.label),
    "score": Output("FP32", lambda row, _: row.score),
    "scores": Output("FP32", _scores_in_label_order, per_label=True),
    "active_adapters": Output("INT32", lambda row, _: row.active_adapters),
    "total_adapters": Output("INT32", lambda row, _: row.total_adapters),
    "flops": Output("FP64", lambda row, _: row.flops.total),
    "adapter_flops": Output("FP64", lambda row, _: row.flops.adapter),
    "adapter_flops_saved": Output("FP64", lambda row, _: row.flops.adapter_saved),
    "tokens": Output("INT32", lambda row, _: row.tokens),
    "input_tokens": Output("INT32", lambda row, _: row.input_tokens),
    "truncated": Output("BOOL", lambda row, _: row.truncated),
}
_NUMPY_TYPES = {"FP32": "<f4", "FP64": "<f8", "INT32": "<i4", "BOOL": "?"}


def _encode_binary(datatype: str, values: list[Any]) -> bytes:
    """Triton's binary layout: little-endian numbers; BYTES as 4-byte length + UTF-8 per element."""
    if datatype == "BYTES":
        parts = []
        for value in values:
            raw = str(value).encode("utf-8")
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.asarray(values, dtype=_NUMPY_TYPES[datatype]).tobytes()


def _decode_bytes_tensor(raw: bytes, name: str) -> list[str]:
    """The elements of a binary BYTES tensor, as text; malformed or non-UTF-8 data is a 422."""
    texts, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequestError(f"input {name[:64]!r}: truncated binary BYTES element")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidRequestError(f"input {name[:64]!r}: binary BYTES element longer than its data")
        try:
            texts.append(raw[offset : offset + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidRequestError(f"input {name[:64]!r}: element {len(texts)} is not UTF-8 text") from None
        offset += size
    return texts


def binary_to_json(body: bytes, header_length: str) -> bytes:
    """A binary-extension body (JSON header + tensor bytes) rewritten as the equivalent JSON body."""
    if not header_length.strip().isdigit() or int(header_length) > len(body):
        raise InvalidRequestError(f"{HEADER_LENGTH} must be a length within the body")
    split = int(header_length)
    try:
        header = json.loads(body[:split])
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequestError("malformed JSON header of a binary request") from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        return body[:split]  # validation names what is missing
    offset = split
    for tensor in header["inputs"]:
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue
        size = parameters.pop("binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(body):
            raise InvalidRequestError("binary_data_size does not match the binary data sent")
        if tensor.get("datatype") != "BYTES":
            raise InvalidRequestError(f"input datatype must be BYTES (texts), got {str(tensor.get('datatype'))[:16]!r}")
        tensor["data"] = _decode_bytes_tensor(body[offset : offset + size], str(tensor.get("name", "")))
        offset += size
    if offset != len(body):
        raise InvalidRequestError(f"{len(body) - offset} bytes of binary data belong to no input")
    return json.dumps(header).encode("utf-8")


class BinaryTensorRoute(APIRoute):
    """An infer body is JSON whatever its Content-Type says (tritonclient sends none that names JSON); with
    Triton's binary tensor data extension it is first turned into the equivalent plain JSON."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            length = request.headers.get(HEADER_LENGTH)
            body = await request.body()
            decoded = body if length is None else binary_to_json(body, length)
            strip = {b"content-type", b"content-length", HEADER_LENGTH.lower().encode()}
            scope = dict(request.scope)
            scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k.lower() not in strip]
            scope["headers"] += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(decoded))]
            plain = Request(scope, request.receive)
            plain._body = decoded  # what FastAPI reads as the body
            return await handler(plain)

        return route


# ---- request translation -------------------------------------------------------------------------------

_REQUEST_PARAMETERS = ("truncate", "threshold", "binary_data_output")


@dataclass(frozen=True)
class RequestOptions:
    truncate: bool
    threshold: float | None
    binary_output: bool


def request_texts(body: InferRequestBody) -> list[str]:
    if len(body.inputs) != 1:
        raise InvalidRequestError(f"expected exactly one input tensor of texts, got {len(body.inputs)}")
    tensor = body.inputs[0]
    where = f"input {tensor.name[:64]!r}"
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(f"{where}: datatype must be BYTES (texts), got {tensor.datatype[:16]!r}")
    if tensor.parameters:
        raise InvalidRequestError(f"{where}: unsupported parameters {sorted(tensor.parameters)[:5]}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise InvalidRequestError(f"{where}: shape must be [n] or [n, 1] with n >= 1, got {shape[:4]}")
    if tensor.data is None:
        raise InvalidRequestError(f"{where} has no data")
    data = tensor.data
    if len(shape) == 2 and all(isinstance(item, list) and len(item) == 1 for item in data):
        data = [item[0] for item in data]
    if len(data) != shape[0]:
        raise InvalidRequestError(f"{where}: shape {shape[:4]} but {len(data)} elements")
    if not all(isinstance(text, str) for text in data):
        raise InvalidRequestError(f"{where}: every element must be a string")
    return data


def request_options(body: InferRequestBody) -> RequestOptions:
    parameters = body.parameters or {}
    unknown = sorted(set(parameters) - set(_REQUEST_PARAMETERS))
    if unknown:
        raise InvalidRequestError(
            f"unknown request parameters {[name[:32] for name in unknown[:5]]}; accepted: {list(_REQUEST_PARAMETERS)}"
        )
    truncate = parameters.get("truncate", True)
    threshold = parameters.get("threshold")
    binary = parameters.get("binary_data_output", False)
    if not isinstance(truncate, bool) or not isinstance(binary, bool):
        raise InvalidRequestError("parameters truncate and binary_data_output must be booleans")
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0
    ):
        raise InvalidRequestError("parameter threshold must be a number between 0 and 1")
    return RequestOptions(truncate=truncate, threshold=threshold, binary_output=binary)


def requested_outputs(body: InferRequestBody, binary_default: bool) -> list[tuple[str, bool]]:
    """(output name, binary) pairs to answer, in request order (default: every output)."""
    if not body.outputs:
        return [(name, binary_default) for name in OUTPUTS]
    chosen = []
    for output in body.outputs:
        if output.name not in OUTPUTS:
            raise InvalidRequestError(f"unknown output {output.name[:64]!r}; outputs: {list(OUTPUTS)}")
        parameters = dict(output.parameters or {})
        binary = parameters.pop("binary_data", binary_default)
        if parameters or not isinstance(binary, bool):
            raise InvalidRequestError(f"output {output.name!r}: only the boolean parameter binary_data is supported")
        chosen.append((output.name, binary))
    return chosen


def infer_response(body: InferRequestBody, answer: Classified, labels: list[str], binary_default: bool) -> Response:
    rows = answer.results
    header: dict[str, Any] = {"model_name": answer.adapter}
    if body.id is not None:
        header["id"] = body.id
    tensors, blobs = [], []
    for name, binary in requested_outputs(body, binary_default):
        output = OUTPUTS[name]
        values = [output.value(row, labels) for row in rows]
        shape = [len(rows), len(labels)] if output.per_label else [len(rows)]
        tensor: dict[str, Any] = {"name": name, "datatype": output.datatype, "shape": shape}
        flat = [value for row_values in values for value in row_values] if output.per_label else values
        if binary:
            blob = _encode_binary(output.datatype, flat)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = flat
        tensors.append(tensor)
    header["outputs"] = tensors
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    headers = answer.timing_headers()
    if not blobs:
        return Response(head, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(len(head))
    return Response(head + b"".join(blobs), media_type="application/octet-stream", headers=headers)
