"""OpenMoE inference: one device, several GPUs with CPU/disk offload, or experts sharded over ranks.

    python infer.py --model outputs/tiny-ep/hf --prompt "Reverse the word: apple. Output:"
    python infer.py --model outputs/tiny-ep/hf --prompt "..." --decode eager   # the reference (transformers' generate)
    python infer.py --model outputs/tiny-ep/hf --prompt_file prompts.txt --do_sample --top_p 0.9 --temperature 0.7
    python infer.py --model OrionZheng/openmoe-8b-chat --chat --interactive --dtype bf16   # hub id, its own tokenizer
    python infer.py --model /ckpt/openmoe-34b --device_map auto --max_memory 0=70GiB,1=70GiB,cpu=200GiB
    colossalai run --nproc_per_node 2 infer.py --model /ckpt/openmoe-8b --ep_size 2 --prompt_file prompts.txt
    torchrun --nproc_per_node 2 infer.py --model /ckpt/openmoe-8b --ep_size 2 --prompt_file prompts.txt  # the same
    python infer.py --model outputs/tiny-ep/hf --serve --port 8000    # OpenAI-compatible server (openmoe/serve)

Decoding: on one CUDA device the static-cache fast decoder (openmoe/fast_decode.py: no host sync per token, the step
under torch.compile reduce-overhead, dropless routing); on CPU, with --device_map and with --ep_size > 1 transformers'
generate over the model (the reference, the checkpoint's capacity routing unless --dropless). --decode chooses.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import TextStreamer

DECODE_MODES = ("auto", "fast", "eager")


def resolve_decode(args, cuda: bool) -> str:
    """--decode auto -> fast on one CUDA device, eager otherwise; fast where it cannot run is refused."""
    one_device = args.device_map is None and args.ep_size == 1
    if args.decode == "auto":
        return "fast" if cuda and one_device else "eager"
    if args.decode == "fast" and not one_device:
        where = f"--device_map {args.device_map}" if args.device_map else f"--ep_size {args.ep_size}"
        raise ValueError(f"--decode fast runs the whole model on one device; with {where} use --decode eager")
    return args.decode


def build_parser() -> argparse.ArgumentParser:
    from openmoe.launch import OneLineErrorParser

    p = OneLineErrorParser(prog="infer.py", description="Generate text with an OpenMoE checkpoint")
    p.add_argument("--model", required=True, help="HF-format checkpoint directory (ours or the published layout), a "
                                                  "hub id (read through the HF cache; HF_HUB_OFFLINE=1 works), or "
                                                  "a preset (tiny/base/8b/34b) with random weights for benchmarking")
    p.add_argument("--tokenizer", default=None, help="sentencepiece .model, tokenizer directory or hub id (default: "
                                                     "the model's own; the shipped test tokenizer for tiny only)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeatable; \\n stands for a newline)")
    src.add_argument("--prompt_file", help="one prompt per line (write \\n for a newline inside a prompt); prompts "
                                           "run as one left-padded batch")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeats (1.0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="bf16 or fp32 (default: bf16 on GPU, fp32 on CPU); fp16 is refused "
                                                 "because OpenMoE degrades in fp16")
    p.add_argument("--decode", default="auto", choices=DECODE_MODES,
                   help="fast: the static-cache fast decoder (one device; routes dropless); eager: transformers' "
                        "generate over the model (the reference; the only choice with --device_map or --ep_size > 1); "
                        "auto: fast on one CUDA device, else eager")
    p.add_argument("--no_compile", action="store_true",
                   help="run the fast decoder's step without torch.compile (compiled by default on CUDA: the first "
                        "call of each batch size compiles first)")
    p.add_argument("--dropless", action="store_true",
                   help="eager decoding: route every token to its experts (no capacity drops): outputs no longer "
                        "depend on the rest of the batch, at the cost of a host sync per MoE layer; default uses the "
                        "checkpoint's eval capacity factor (2.0 for the published models), which can drop tokens in "
                        "large batches. The fast decoder always routes dropless")
    p.add_argument("--device_map", default=None, help="'auto': spread decoder layers over all visible GPUs, then CPU, "
                                                      "then disk (HF accelerate)")
    p.add_argument("--max_memory", default=None, help="per-device budget for --device_map, e.g. 0=20GiB,cpu=64GiB")
    p.add_argument("--offload_dir", default=None, help="folder for weights offloaded to disk")
    p.add_argument("--ep_size", type=int, default=1, help="expert-parallel ranks (launch with colossalai run)")
    p.add_argument("--chat", action="store_true", help="apply the OpenMoE-8B-Chat template and its stop rules")
    p.add_argument("--system", default=None, help="system prompt for --chat")
    p.add_argument("--interactive", action="store_true", help="chat on stdin, keeping the conversation")
    p.add_argument("--no_stream", action="store_true", help="print whole answers instead of streaming tokens")
    return p


def check_args(args) -> None:
    """Values argparse's types let through but generation cannot use (checked before any model is loaded)."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens ({args.max_new_tokens}) must be >= 1")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p ({args.top_p}) must be in (0, 1]; 1.0 is off")
    if not args.temperature >= 0:  # NaN too
        raise ValueError(f"--temperature ({args.temperature}) must be >= 0")
    if args.top_k < 0:
        raise ValueError(f"--top_k ({args.top_k}) must be >= 0; 0 is off")


class Session:
    """Everything one generation needs; `generate(prompts)` returns completions in order (on every rank)."""

    def __init__(self, args):
        from openmoe import ModelOptions, data, hub, inference
        from openmoe.tokenizer import load_tokenizer

        self.args = args
        self.rank, self.world = 0, 1
        cuda = torch.cuda.is_available()
        self.decode = resolve_decode(args, cuda)
        self.compile = cuda and not args.no_compile
        dtype = inference.check_dtype(args.dtype or ("bf16" if cuda else "fp32"))
        if args.ep_size > 1:
            self.rank, self.world = inference.init_expert_parallel(
                args.ep_size, f"colossalai run --nproc_per_node {args.ep_size} infer.py")
        model_dir = hub.resolve_model(args.model)  # a directory, a hub id (HF cache) or None for a preset
        self.tokenizer = load_tokenizer(hub.tokenizer_path(model_dir, args.model, args.tokenizer))
        model = inference.load_model(model_dir or args.model, dtype, args.seed, args.device_map,
                                     inference.parse_max_memory(args.max_memory), args.offload_dir,
                                     ModelOptions(dropless=args.dropless))
        data.check_vocab(self.tokenizer, model.config.vocab_size)
        if args.ep_size > 1:
            import torch.distributed as dist

            inference.shard_experts(model, dist.group.WORLD)
            self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
            model = model.to(self.device)
        elif args.device_map:
            self.device = inference.input_device(model)
        else:
            self.device = torch.device("cuda" if cuda else "cpu")
            model = model.to(self.device)
        self.model = model

    def generate(self, prompts: list[str], stream=None) -> list[str]:
        """This rank's share of the prompts as one left-padded batch, through the fast decoder or transformers'
        generate. Expert-parallel ranks run the latter with synced_gpus: a rank whose rows are done keeps stepping
        (every step's MoE all-to-all needs all ranks) until every rank is done."""
        from openmoe import inference

        a, cfg = self.args, self.model.config
        # every rank encodes and checks every prompt, so that all of them stop together and share one prompt width
        ids, mask = inference.encode_batch(self.tokenizer, prompts)  # [B, S] left-padded
        longest = int(mask.sum(1).max())
        if longest + a.max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"a prompt of {longest} tokens + --max_new_tokens {a.max_new_tokens} exceeds the model's "
                             f"max_position_embeddings ({cfg.max_position_embeddings}); shorten the prompt or "
                             "--max_new_tokens")
        mine, real = inference.rank_rows(len(prompts), self.rank, self.world)  # all rows on one process
        ids, mask = ids[mine], mask[mine]
        torch.manual_seed(a.seed + self.rank)  # sampling draws from the global generator
        if self.decode == "fast":
            out = self._fast(ids.to(self.device), mask.to(self.device), stream)
        else:
            out = self._eager(ids.to(self.device), mask.to(self.device), stream)
        texts = [self._completion(row[ids.shape[1]:].tolist()) for row in out[:real].cpu()]
        if self.world == 1:
            return texts
        import torch.distributed as dist

        gathered = [None] * self.world
        dist.all_gather_object(gathered, list(zip(mine[:real], texts)))
        by_index = dict(pair for part in gathered for pair in part)
        return [by_index[i] for i in range(len(prompts))]

    def _fast(self, ids, mask, stream):
        """The static-cache decoder kept on the model (rebuilt larger when a batch or a conversation outgrows it);
        chat stops on the token pieces that spell </s> as well as on EOS."""
        from openmoe import inference

        a, cfg = self.args, self.model.config
        decoder = inference.cached_decoder(self.model, ids.shape[0], ids.shape[1] + a.max_new_tokens,
                                           compile=self.compile)
        return inference.generate_streamed(
            decoder, ids, stream, attention_mask=mask, max_new_tokens=a.max_new_tokens, do_sample=a.do_sample,
            temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
            eos_token_id=cfg.eos_token_id,
            stop_sequences=inference.chat_stop_sequences(self.tokenizer) if a.chat else (),
            vocab_limit=len(self.tokenizer) if cfg.vocab_size > len(self.tokenizer) else None)

    def _eager(self, ids, mask, stream):
        """transformers' generate (fast_decode=False: the reference path); expert-parallel ranks with synced_gpus."""
        a, cfg = self.args, self.model.config
        extra = {}
        if cfg.vocab_size > len(self.tokenizer):  # the embedding is padded past the tokenizer (256384 vs 256300)
            extra["suppress_tokens"] = list(range(len(self.tokenizer), cfg.vocab_size))
        if a.chat:  # OpenMoE-8B-Chat often spells </s> as ordinary pieces instead of emitting EOS
            extra.update(stop_strings=["</s>"], tokenizer=self.tokenizer)
        if a.do_sample:  # top_k 0 and top_p 1.0 are "off" for transformers too
            extra.update(do_sample=True, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
        return self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=a.max_new_tokens,
            repetition_penalty=a.repetition_penalty, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
            streamer=stream, synced_gpus=self.world > 1, fast_decode=False, **extra)

    def _completion(self, new_ids: list[int]) -> str:
        from openmoe import data

        eos = self.model.config.eos_token_id
        if eos in new_ids:
            new_ids = new_ids[: new_ids.index(eos)]
        text = data.decode(self.tokenizer, new_ids)
        return text.split("</s>")[0].strip() if self.args.chat else text.strip()  # drop a spelled-out </s>


class Streamer(TextStreamer):
    """transformers' TextStreamer for the answer (batch of one), which stops printing at a spelled-out </s>."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.shown, self.stopped = "", False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.stopped:
            return
        if "</s>" in self.shown + text:
            text, self.stopped = (self.shown + text).split("</s>")[0][len(self.shown):], True
        self.shown += text
        print(text, end="" if not stream_end else "", flush=True)


def run(args) -> int:
    from openmoe import inference

    session = Session(args)
    stream_ok = not args.no_stream and session.rank == 0
    if args.interactive:
        turns = []
        system = args.system or inference.CHAT_SYSTEM
        for line in sys.stdin:
            user = line.strip()
            if not user:
                continue
            turns.append(("user", user))
            prompt = inference.chat_prompt(turns, system) if args.chat else user
            streamer = Streamer(session.tokenizer) if stream_ok and session.world == 1 else None
            if session.rank == 0:
                print("assistant> ", end="", flush=True)
            answer = session.generate([prompt], stream=streamer)[0]
            if session.rank == 0:
                print("" if streamer else answer, flush=True)
            turns.append(("assistant", answer))
        return 0
    if args.prompt_file:
        with open(args.prompt_file) as f:
            # one prompt per line; a literal "\n" inside a line stands for a newline in the prompt
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--prompt_file {args.prompt_file} holds no prompt (one per non-empty line)")
    elif args.prompt:
        prompts = [p.replace("\\n", "\n") for p in args.prompt]  # "\n" typed in a shell means a newline
    else:
        raise ValueError("give --prompt, --prompt_file or --interactive")
    if args.chat:
        prompts = [inference.chat_prompt([("user", p)], args.system or inference.CHAT_SYSTEM) for p in prompts]
    streamer = Streamer(session.tokenizer) if stream_ok and len(prompts) == 1 and session.world == 1 else None
    answers = session.generate(prompts, stream=streamer)
    if session.rank == 0:
        if streamer is not None:
            print(flush=True)
        else:
            for i, answer in enumerate(answers):
                print(f"=== {i}: {answer}", flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--serve" in argv:  # the OpenAI-compatible server: its options are `python -m openmoe.serve --help`'s
        from openmoe.serve.cli import main as serve

        return serve([a for a in argv if a != "--serve"])
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
