"""OpenAI-compatible HTTP server for OpenMoE checkpoints (standard library HTTP, no web framework).

    python -m openmoe.serve --model outputs/tiny-ep/hf --port 8000
    torchrun --nproc_per_node 2 -m openmoe.serve --model /ckpt/openmoe-8b --ep_size 2   # experts sharded, rank 0 serves

Endpoints: POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat_template, else the OpenMoE-8B-Chat
template), both with `"stream": true` as server-sent events; GET /v1/models; GET /health.
Request fields: max_tokens, temperature (0 = greedy; OpenAI's default 1.0 samples), top_p, top_k, repetition_penalty,
stop (up to 4 strings), seed, stream, stream_options.include_usage; n = 1 only. A bad field gets a 400 whose message
names it; a full queue a 429; a stopped engine a 503.

How a request flows:
  HTTP thread   validates and tokenizes, queues one `Sequence` per prompt (bounded: 429 when full), then waits on
                its events (streaming: writes each text delta as it arrives).
  engine thread (--decode eager / static) takes the oldest waiting sequence plus every other waiting one with the
                same sampling options (up to --max_batch_size, after waiting --batch_window_ms for more), and runs
                them as ONE left-padded call of `generate_batch`; per-step tokens update each sequence (stop strings,
                max_tokens, EOS), and the call ends early once every row is done (or its client went away).
                (--decode continuous) keeps a continuous.SlotDecoder's slots busy instead: a sequence with the running
                options joins at the next host read (every few steps) and leaves when done (ContinuousEngine).
Routing is dropless by default, so a row's tokens do not depend on which requests share its batch (with capacity
routing a busy expert drops tokens depending on the other rows).
Expert parallelism: every rank runs the engine loop's `generate_batch` calls together. Rank 0 broadcasts each batch
(prompts and options); rank r decodes rows r, r + ep, ...; after every step the ranks all-gather the new tokens and
rank 0 broadcasts its stop decision (SplitRows); the other ranks only follow (`follow`).
`generate_batch` and the SlotDecoder (admit / step / release) are the only ways the engine touches the model.

Modules: api.py (OpenAI formats, validation), engine.py (model adapter, Sequence, the engines, the expert-parallel
row split), server.py (HTTP, server-sent events), cli.py (options, loading, start / stop).
"""

from openmoe.serve.api import GenOptions, RequestError
from openmoe.serve.cli import DECODE_MODES, build_parser, load, main, start, stop
from openmoe.serve.engine import ContinuousEngine, Engine, SplitRows, generate_batch

__all__ = ["GenOptions", "RequestError", "DECODE_MODES", "build_parser", "load", "main", "start", "stop",
           "ContinuousEngine", "Engine", "SplitRows", "generate_batch"]
