"""The channel between the API process and the engine process: length-prefixed msgpack frames.

One Unix stream socket carries every message both ways; each frame is a 4-byte big-endian length
and a msgpack map with an ``op``. Token ids travel as packed int32 arrays, results as lists of
numbers (float32 values survive as msgpack doubles bit for bit). Nothing is pickled: a frame is
data, never code.

The messages (``id`` pairs a reply with its request):

===========  =========================================================================
API ->       ``classify`` (id, adapter, ids, lengths, input_tokens, threshold),
             ``cancel`` (id), ``call`` (id, method, args: admin changes), ``stop``
<- engine    ``ready``, ``failed`` (reason), ``result`` (id, rows), ``error`` (id, the
             ServiceError), ``reply`` (id, value), ``batch`` (stats, queue depth),
             ``loaded`` (name, seconds), ``evicted`` (name)
===========  =========================================================================
"""

from __future__ import annotations

import asyncio
import struct
from array import array
from dataclasses import asdict
from typing import Any

import msgpack

from service import errors
from service.types import BatchStats, RoutingSample, RowOutput, ShadowOutcome, TokenizedRequest

_LENGTH = struct.Struct(">I")
#: Largest frame accepted (a request of 64 inputs of 512 tokens is ~130 kB).
MAX_FRAME_BYTES = 256 << 20


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next message; ``asyncio.IncompleteReadError`` when the other side closed."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return msgpack.unpackb(await reader.readexactly(length), raw=False, strict_map_key=False)


def frame(message: dict[str, Any]) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return _LENGTH.pack(len(payload)) + payload


# ---- requests ----------------------------------------------------------------------------------


def encode_request(request: TokenizedRequest) -> dict[str, Any]:
    flat = array("i", (token for row in request.ids for token in row))
    return {
        "adapter": request.adapter,
        "ids": flat.tobytes(),
        "lengths": [len(row) for row in request.ids],
        "input_tokens": request.input_tokens,
        "threshold": request.threshold,
        "client": request.client,
        "revision": request.revision,
    }


def decode_request(message: dict[str, Any]) -> TokenizedRequest:
    flat = array("i")
    flat.frombytes(message["ids"])
    ids, start = [], 0
    for length in message["lengths"]:
        ids.append(flat[start : start + length].tolist())
        start += length
    return TokenizedRequest(
        adapter=message["adapter"],
        ids=ids,
        input_tokens=message["input_tokens"],
        threshold=message["threshold"],
        client=message["client"],
        revision=message["revision"],
    )


# ---- results and errors ------------------------------------------------------------------------


def encode_rows(rows: list[RowOutput]) -> list[list[Any]]:
    return [
        [
            row.probabilities,
            row.logits,
            row.active_sites,
            row.active_ranks,
            list(row.flops),
            row.tokens,
            row.input_tokens,
            row.inference_seconds,
            row.queue_seconds,
        ]
        for row in rows
    ]


def decode_rows(rows: list[list[Any]]) -> list[RowOutput]:
    return [
        RowOutput(
            probabilities=probs,
            logits=logits,
            active_sites=sites,
            active_ranks=ranks,
            flops=tuple(flops),
            tokens=tokens,
            input_tokens=input_tokens,
            inference_seconds=inference,
            queue_seconds=queue,
        )
        for probs, logits, sites, ranks, flops, tokens, input_tokens, inference, queue in rows
    ]


def encode_error(error: errors.ServiceError) -> dict[str, Any]:
    return {"type": type(error).__name__, "message": error.message, "retry_after": error.retry_after}


def decode_error(message: dict[str, Any]) -> errors.ServiceError:
    """The same ServiceError subclass the engine raised (an unknown one becomes an InferenceError)."""
    kind = getattr(errors, message["type"], None)
    if not (isinstance(kind, type) and issubclass(kind, errors.ServiceError)):
        return errors.InferenceError(message["message"])
    error = kind.__new__(kind)
    errors.ServiceError.__init__(error, message["message"], retry_after=message.get("retry_after"))
    return error


# ---- batch statistics --------------------------------------------------------------------------


def encode_stats(stats: BatchStats) -> dict[str, Any]:
    return asdict(stats)


def decode_stats(message: dict[str, Any]) -> BatchStats:
    return BatchStats(
        **{key: value for key, value in message.items() if key not in ("shadow", "routing")},
        shadow=tuple(ShadowOutcome(**outcome) for outcome in message["shadow"]),
        routing=tuple(
            RoutingSample(
                adapter=sample["adapter"],
                rows=sample["rows"],
                active=tuple(sample["active"]),
                reference=tuple(sample["reference"]),
            )
            for sample in message["routing"]
        ),
    )
