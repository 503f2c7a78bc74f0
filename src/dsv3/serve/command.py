"""`dsv3 serve`: the OpenAI-compatible server. The engine runs in this process, the HTTP front-end (uvicorn) in a
child process. On SIGTERM (or Ctrl-C) the front-end stops accepting connections and lets running requests finish
for up to --shutdown-timeout seconds, cancels the rest, then the engine loop stops and the process exits (status
0; 130 after Ctrl-C)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dsv3.engine.config import add_model_options, build_llm
from dsv3.serve import MAX_REQUEST_BYTES

# Engine options where serving wants other defaults than offline generation: requests arrive one by one, and
# holding new prompts for two prefill steps' time lets one step prefill several (EngineConfig.prefill_delay_factor).
SERVE_DEFAULTS = {"prefill_delay_factor": 2.0}
# One front-end process per 4 cores, at most 4: on an H200 host (16 cores) 4 front-ends served moonlight-16b's
# 256 streams at 13,631 tok/s against 11,236 for one, which fell behind (0.44 chunks a token); at 64 streams the same.
SERVE_DEFAULT_API_SERVERS = min(4, max(1, (os.cpu_count() or 1) // 4))


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a checkpoint behind an OpenAI-compatible HTTP API",
                              description=__doc__)
    add_model_options(p, **SERVE_DEFAULTS)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-servers", type=int, default=SERVE_DEFAULT_API_SERVERS,
                   help="HTTP front-end processes sharing the port (JSON and server-sent events for hundreds of "
                        "streams need more than one core; default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health: /metrics and the docs "
                        "(/docs, /redoc, /openapi.json) too, unless --public-metrics-and-docs (default: "
                        "$DSV3_API_KEY, else none)")
    p.add_argument("--public-metrics-and-docs", action="store_true",
                   help="with --api-key, let /metrics and the docs answer without the key (as vLLM leaves /metrics "
                        "open); by default they need it, since they tell anyone how busy the server is")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model names clients may send, /v1/models lists them (default: the checkpoint "
                        "directory's name, and the name it has behind symbolic links, or 'dsv3' for the embedded "
                        "model)")
    p.add_argument("--default-max-tokens", type=int, default=None, metavar="N",
                   help="the most tokens generated for a request that sets no max_tokens (default: none, as vLLM: "
                        "such a request may generate until the context is full)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES, metavar="BYTES",
                   help="larger request bodies get 413 before they are read (default: 8 MiB, room for a whole "
                        "160K-token context)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM; then they fail (a stream ends "
                        "with an error event and [DONE])")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401  (the front-end process's, checked before the model loads)
        import uvicorn  # noqa: F401

        from dsv3.serve.frontend import serve
    except ImportError as e:
        raise SystemExit(f"dsv3 serve needs FastAPI and uvicorn ({e}); pip install 'dsv3[serve]'") from None
    llm = build_llm(args)
    if llm.follower:  # under torchrun, ranks other than 0 ran rank 0's steps inside LLM() until it closed
        return 0
    names = args.served_model_name or default_model_names(args.model)
    try:
        return serve(llm.engine, names, host=args.host, port=args.port, api_key=args.api_key,
                     api_servers=args.api_servers, shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
                     public_metrics_and_docs=args.public_metrics_and_docs, max_request_bytes=args.max_request_bytes,
                     default_max_tokens=args.default_max_tokens)
    finally:
        llm.close()  # releases the other ranks (the engine loop has stopped by now)


def default_model_names(model: str | None) -> list[str]:
    """What clients may call the checkpoint at `model`: its directory's name as given ('DeepSeek-V3' for
    /path/to/DeepSeek-V3, as the README's client sends), and the name it has behind symbolic links; 'dsv3' for the
    embedded model."""
    if model is None:
        return ["dsv3"]
    names = [Path(model).name, Path(model).resolve().name]  # the first is '' for '.'
    return [name for i, name in enumerate(names) if name and name not in names[:i]]
