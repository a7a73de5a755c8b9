"""Serve a model on an OpenAI-compatible `/v1` API: `posttrain serve MODEL_OR_RUN`.

`engine.py` batches concurrent requests on one model with several LoRA adapters, `api.py`
is the FastAPI app (routes, validation, OpenAI error format, SSE streaming, API key), and
`cli.py` loads the model and runs uvicorn (or vLLM's own server with `engine=vllm`).

Simplified on purpose: static batches on one device with HF's KV cache; vLLM is the option
for continuous batching and paged attention on CUDA.
"""
