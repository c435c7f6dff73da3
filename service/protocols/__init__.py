"""Other protocols in front of the one classification path (``service.classification``).

``tei``: text-embeddings-inference style routes, which Hugging Face's ``InferenceClient`` speaks.
``oip``: the Open Inference Protocol v2 (KServe, Triton's ``tritonclient``), with Triton's binary
tensor data extension. Each module only translates requests and answers; nothing here batches,
runs a model or records metrics on its own.
"""
