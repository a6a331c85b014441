"""The HTTP side: ThreadingHTTPServer routes, JSON bodies, server-sent events (chunked), OpenAI error format."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from openmoe.serve.api import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    RequestError,
    parse_messages,
    parse_options,
    parse_prompts,
    render_chat,
    response_body,
    usage,
)
from openmoe.serve.engine import Engine, Sequence, encode


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, engine: Engine, model_name: str, max_model_len: int, default_max_tokens: int,
                 verbose: bool = False):
        super().__init__(address, Handler)
        self.engine, self.model_name, self.max_model_len = engine, model_name, max_model_len
        self.default_max_tokens, self.verbose = default_max_tokens, verbose
        self.created = int(time.time())

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):  # a client hanging up is normal
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, fmt, *args):
        if self.server.verbose:
            super().log_message(fmt, *args)

    # ---- routes
    def do_GET(self):
        if self.path == "/health":
            ok = self.server.engine.alive
            return self._json(200 if ok else 503, {"status": "ok" if ok else "engine stopped"})
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.created,
                 "owned_by": "openmoe"}]})
        self._error(RequestError(404, f"no route GET {self.path}; GET /health, /v1/models", kind="not_found_error"))

    def do_POST(self):
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        if self.path not in routes:
            body_len = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(body_len)
            return self._error(RequestError(404, f"no route POST {self.path}; POST {sorted(routes)}",
                                            kind="not_found_error"))
        try:
            self._generate(self._body(), chat=routes[self.path])
        except RequestError as e:
            self._error(e)
        except Exception as e:  # a bug of ours: answer it rather than drop the connection
            self._error(RequestError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    # ---- generation
    def _generate(self, body: dict, chat: bool):
        srv = self.server
        name = body.get("model")
        if name is not None and name != srv.model_name:
            raise RequestError(404, f"model {name!r} is not served here; served: {srv.model_name!r}", "model",
                               "not_found_error")
        options, stream, include_usage = parse_options(body, CHAT_FIELDS if chat else COMPLETION_FIELDS,
                                                       srv.default_max_tokens)
        tok = srv.engine.tokenizer
        prompts = [render_chat(tok, parse_messages(body))] if chat else parse_prompts(body)
        if chat:
            options = replace(options, stop=options.stop + ("</s>",))  # the chat model's spelled-out EOS
        events, cancelled = queue.Queue(), threading.Event()
        seqs = []
        for i, p in enumerate(prompts):
            n = len(encode(tok, p))
            if n + options.max_tokens > srv.max_model_len:
                field_name = "messages" if chat else "prompt"
                raise RequestError(400, f"'max_tokens' ({options.max_tokens}) + the {field_name} ({n} tokens) = "
                                        f"{n + options.max_tokens} exceeds the model's context ({srv.max_model_len}"
                                        " tokens); lower max_tokens or shorten the prompt", "max_tokens")
            seqs.append(Sequence(p, n, options, i, events, cancelled, tok))
        srv.engine.submit(seqs)
        meta = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", created=int(time.time()),
                    model=srv.model_name)
        try:
            if stream:
                self._stream(seqs, events, meta, chat, include_usage)
            else:
                self._wait(seqs, events)
                self._json(200, response_body(seqs, meta, chat))
        except (BrokenPipeError, ConnectionResetError):
            cancelled.set()  # the engine drops these rows at the next step

    def _wait(self, seqs, events):
        left = len(seqs)
        while left:
            ev = events.get()
            if ev[0] == "error":
                raise RequestError(ev[1], ev[2], kind="server_error")
            left -= ev[0] == "done"

    def _stream(self, seqs, events, meta, chat, include_usage):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index, text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {**meta, "object": obj, "choices": [choice]}

        if chat:
            self._event(chunk(0, role=True))
        left = len(seqs)
        while left:
            ev = events.get()
            if ev[0] == "error":
                self._event({"error": RequestError(ev[1], ev[2], kind="server_error").body()["error"]})
                break
            if ev[0] == "delta":
                self._event(chunk(ev[1], ev[2]))
            else:
                left -= 1
                self._event(chunk(ev[1], finish=seqs[ev[1]].finish_reason))
        if include_usage:
            self._event({**meta, "object": obj, "choices": [], "usage": usage(seqs)})
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    # ---- wire format
    def _body(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError(400, f"Content-Length {self.headers.get('Content-Length')!r} is not a number") from None
        raw = self.rfile.read(n)
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def _json(self, status: int, obj: dict, headers: dict | None = None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError):
        self._json(e.status, e.body(), {"Retry-After": "1"} if e.status in (429, 503) else None)

    def _event(self, obj: dict):
        self._write_chunk(f"data: {json.dumps(obj)}\n\n".encode())

    def _write_chunk(self, data: bytes):
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
