"""`python -m openmoe.serve`: options, loading (one device or experts sharded over ranks), start and stop."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

import torch

from openmoe.serve.engine import ContinuousEngine, Engine, follow
from openmoe.serve.server import Server

DECODE_MODES = ("eager", "static", "continuous")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="OpenAI-compatible server for an OpenMoE checkpoint")
    p.add_argument("--model", required=True, help="HF-format checkpoint directory (or a preset name, random weights)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the checkpoint directory)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the chosen one is printed)")
    p.add_argument("--served_model_name", default=None, help="the id clients pass as 'model' (default: the "
                                                              "checkpoint directory's name)")
    p.add_argument("--dtype", default=None, help="bf16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--ep_size", type=int, default=1, help="expert-parallel ranks (launch with colossalai run)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="max_tokens of a request that gives none")
    p.add_argument("--max_model_len", type=int, default=None,
                   help="prompt + max_tokens limit (default: the config's max_position_embeddings)")
    p.add_argument("--max_batch_size", type=int, default=8, help="sequences per generate call")
    p.add_argument("--max_queue", type=int, default=64, help="waiting sequences before requests get 429")
    p.add_argument("--batch_window_ms", type=float, default=10.0,
                   help="how long the engine waits for more requests before starting a batch")
    p.add_argument("--capacity_routing", action="store_true",
                   help="keep the checkpoint's eval capacity factor (tokens may be dropped, and a row's output then "
                        "depends on the other rows of its batch); default: dropless routing")
    p.add_argument("--decode", default="auto", choices=["auto", *DECODE_MODES],
                   help="eager: static batches through generation.generate (the reference); static: static batches "
                        "through openmoe/fast_decode.py (static KV cache, no host sync per token); continuous: "
                        "sequences join and leave the running batch (openmoe/continuous.py); auto: continuous with "
                        "--compile on one GPU, eager otherwise (CPU, --ep_size > 1, --capacity_routing)")
    p.add_argument("--compile", action="store_true", help="torch.compile(mode='reduce-overhead') the decode step of "
                                                          "--decode static/continuous (CUDA graphs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset --model")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    return p


def _check_args(a) -> None:
    for name in ("max_new_tokens", "max_batch_size", "max_queue", "ep_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name} ({getattr(a, name)}) must be >= 1")
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port ({a.port}) must be in [0, 65535]")
    if a.decode in ("static", "continuous") and a.capacity_routing:
        raise ValueError(f"--decode {a.decode} routes dropless (no data-dependent shapes); --capacity_routing needs "
                         "--decode eager")
    if a.decode in ("static", "continuous") and a.ep_size > 1:
        raise ValueError(f"--decode {a.decode} runs on one device; with --ep_size {a.ep_size} use --decode eager")
    if a.batch_window_ms < 0:
        raise ValueError(f"--batch_window_ms ({a.batch_window_ms}) must be >= 0")


def load(a):
    """(model, tokenizer, rank) on this process's device; experts sharded over ranks when --ep_size > 1."""
    from openmoe import data, inference
    from openmoe.config import ModelOptions

    cuda = torch.cuda.is_available()
    dtype = inference.check_dtype(a.dtype or ("bf16" if cuda else "fp32"))
    rank = 0
    if a.ep_size > 1:
        rank, _ = inference.init_expert_parallel(a.ep_size, f"torchrun --nproc_per_node {a.ep_size} -m openmoe.serve")
    tokenizer_path = a.tokenizer or a.model
    if not os.path.isdir(tokenizer_path) and not os.path.isfile(tokenizer_path):
        raise ValueError(f"--model {a.model} is not a directory holding a tokenizer: pass --tokenizer PATH")
    tokenizer = data.load_tokenizer(tokenizer_path)
    options = None if a.capacity_routing else ModelOptions(dropless=True)
    model = inference.load_model(a.model, dtype, a.seed, options=options)
    data.check_vocab(tokenizer, model.config.vocab_size)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    if a.ep_size > 1:
        import torch.distributed as dist

        inference.shard_experts(model, dist.group.WORLD)
    return model.to(device), tokenizer, rank


def start(model, tokenizer, host="127.0.0.1", port=0, model_name="openmoe", max_model_len=None,
          default_max_tokens=64, max_batch_size=8, max_queue=64, batch_window_s=0.01, distributed=False,
          verbose=False, decode="eager", compile=False) -> Server:
    """Engine + HTTP server, serving from a background thread; `stop(server)` ends both.
    decode: "eager" (static batches through generation.generate), "static" (static batches through
    fast_decode.FastDecoder), "continuous" (continuous.SlotDecoder); compile: CUDA graphs for the latter two."""
    max_model_len = max_model_len or model.config.max_position_embeddings
    if decode not in DECODE_MODES:
        raise ValueError(f"decode '{decode}' is not supported; accepted: {list(DECODE_MODES)}")
    if decode == "continuous":
        from openmoe.continuous import SlotDecoder

        slots = SlotDecoder(model, max_batch_size, max_model_len, compile=compile, vocab_limit=len(tokenizer))
        engine = ContinuousEngine(model, tokenizer, slots, max_queue, batch_window_s)
    else:
        decoder = None
        if decode == "static":
            from openmoe.fast_decode import FastDecoder

            decoder = FastDecoder(model, max_batch_size, max_model_len, compile=compile)
        engine = Engine(model, tokenizer, max_batch_size, max_queue, batch_window_s, distributed, decoder)
    server = Server((host, port), engine, model_name, max_model_len, default_max_tokens,
                    verbose)  # binds the port: fails before the engine thread starts
    engine.start()
    threading.Thread(target=server.serve_forever, name="openmoe-http", daemon=True).start()
    return server


def stop(server: Server) -> None:
    server.shutdown()
    server.server_close()
    server.engine.stop()


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        _check_args(a)
        model, tokenizer, rank = load(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if rank != 0:
        follow(model, tokenizer)
        torch.distributed.destroy_process_group()
        return 0
    name = a.served_model_name or os.path.basename(os.path.normpath(a.model))
    decode, compile = a.decode, a.compile
    if decode == "auto":
        gpu = torch.cuda.is_available() and a.ep_size == 1 and not a.capacity_routing
        decode, compile = ("continuous", True) if gpu else ("eager", False)
    server = start(model, tokenizer, a.host, a.port, name, a.max_model_len, a.max_new_tokens, a.max_batch_size,
                   a.max_queue, a.batch_window_ms / 1000, a.ep_size > 1, a.verbose, decode, compile)
    mode = decode + (" compiled" if compile else "")
    print(f"serving {name} on {server.url}/v1 (decode {mode}, max_batch_size {a.max_batch_size}, queue "
          f"{a.max_queue}, pid {os.getpid()})", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())  # a clean stop, which also releases the following ranks
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(server)
        if a.ep_size > 1:
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
