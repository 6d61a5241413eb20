"""The `mistral-serve` command line."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
import sys
import time

from mistral_serve.cli_admin import add_admin_commands
from mistral_serve.cli_settings import open_database, settings_from, storage_flags
from mistral_serve.model.precision import DTYPE_CHOICES, QUANTIZATIONS
from mistral_serve.settings import SIGNUP_MODES
from mistral_serve.upstream.config import POLICIES
from mistral_serve.settings import ANY_ADDRESS, LOOPBACK_NAMES, Settings

log = logging.getLogger(__name__)

ENGINE_PORT = 8001
ENGINE_KEEP_ALIVE_S = 75
ENGINE_TOKEN_VARIABLE = "MISTRAL_SERVE_ENGINE_TOKEN"


def engine_flags(parser: argparse.ArgumentParser, *, serves_many_models: bool = False) -> None:
    if serves_many_models:
        parser.add_argument("--model", dest="models", action="append", metavar="ID=PATH", default=[],
                            help="serve the checkpoint PATH (directory, GGUF file, Hugging Face id or \"demo\") "
                                 "as model ID; repeatable (default: the demo model and every "
                                 "Mistral-7B-Instruct in the local Hugging Face cache)")
    else:
        parser.add_argument("--model", help='checkpoint directory, GGUF file, Hugging Face id, or "demo"')
    parser.add_argument("--allow-download", action="store_true", default=None,
                        help="download a Hugging Face id that is not in the local cache")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES)
    parser.add_argument("--quantize", choices=QUANTIZATIONS,
                        help="quantization at load time: int8 or int4 weights (int4: CPU), or w8a8, int8 weights "
                             "and 8-bit activations (CPU; faster than int8 for batches and prefill, less precise)")
    parser.add_argument("--threads", type=int, help="CPU threads for the model (default: $OMP_NUM_THREADS, else "
                                                    "every core)")
    parser.add_argument("--kv-cache-memory-mb", type=int, help="memory for the paged KV cache")
    parser.add_argument("--max-num-seqs", type=int, help="sequences decoded together at most")
    parser.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step at most")
    parser.add_argument("--max-model-len", type=int, help="context length to serve (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, help="seed for requests that bring none")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral-serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="answer one chat message from the command line")
    engine_flags(generate)
    generate.add_argument("message", help="the user message")
    generate.add_argument("--system", help="a system prompt")
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.set_defaults(run=run_generate)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    engine_flags(serve, serves_many_models=True)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("--redis-url", help="redis://HOST:PORT/DB for rate-limit counters shared by several "
                                           "replicas (env MISTRAL_SERVE_REDIS_URL; default: in this process)")
    reach = serve.add_argument_group("hosts and proxies")
    reach.add_argument("--allowed-hosts", help="comma-separated names the server answers to in the Host header, or * "
                                               "for any (env MISTRAL_SERVE_ALLOWED_HOSTS; default: localhost, "
                                               "127.0.0.1, ::1 and the --host address); other hosts get 400")
    reach.add_argument("--forwarded-allow-ips", help="comma-separated addresses or networks of proxies whose "
                                                     "X-Forwarded-For and X-Forwarded-Proto are believed, or * "
                                                     "(env MISTRAL_SERVE_FORWARDED_ALLOW_IPS; default: none)")
    reach.add_argument("--signup", choices=SIGNUP_MODES,
                       help="who may open an account from the dashboard: nobody (closed: operators make accounts "
                            "with `mistral-serve accounts create`), holders of an invitation code (invite: "
                            "`mistral-serve invites create`), or anyone (open) (env MISTRAL_SERVE_SIGNUP; default: "
                            "open when --host is a loopback address, else closed)")
    limits = serve.add_argument_group("backpressure and faults")
    limits.add_argument("--max-queued-requests", type=int,
                        help="requests waiting to start, per model, before new ones get 503 (default 256)")
    limits.add_argument("--max-queued-prompt-tokens", type=int,
                        help="prompt tokens waiting to start, per model, before new requests get 503 (default 262144)")
    limits.add_argument("--queue-timeout", dest="queue_timeout_s", type=float,
                        help="seconds a request may wait to start before it gets 503 (default 120)")
    limits.add_argument("--max-concurrent-requests-per-key", type=int,
                        help="requests in flight per API key before new ones get 429 (default 32)")
    limits.add_argument("--max-concurrent-requests-per-account", type=int,
                        help="requests in flight per account, all its keys together, before new ones get 429 "
                             "(default 32; a plan may set less)")
    limits.add_argument("--max-generated-tokens-per-request", type=int,
                        help="n × max_tokens of one request at most (default 131072)")
    limits.add_argument("--max-logprobs-per-request", type=int,
                        help="n × max_tokens × (1 + top_logprobs) of one request with logprobs at most (default 131072)")
    limits.add_argument("--shutdown-timeout", dest="shutdown_timeout_s", type=float,
                        help="on SIGTERM, seconds in-flight requests may take to finish (default 30)")
    limits.add_argument("--database-outage-grace", dest="database_outage_grace_s", type=float,
                        help="seconds a recently checked key keeps working while the database is away (default 300)")
    limits.add_argument("--max-usage-backlog-mb", type=int,
                        help="usage rows waiting on disk for the database before chat gets 503 (default 256)")
    pools = serve.add_argument_group("pools of upstreams (README \"Scaling out\")")
    pools.add_argument("--upstream", dest="upstreams", action="append", metavar="ID=URL[,OPTION=VALUE…]", default=[],
                       help="serve model ID from the OpenAI-compatible server at URL (its base, e.g. "
                            "http://10.0.0.5:8001/v1): a `mistral-serve engine`, vLLM, SGLang, llama.cpp's server or a "
                            "router; repeat it for each upstream of a pool. Options: model=NAME (the upstream's name "
                            "for it), name=NAME, health_path=/PATH, token_env=VARIABLE")
    pools.add_argument("--upstream-token-env", metavar="VARIABLE",
                       help="the environment variable holding the token sent to upstreams whose flag names none")
    pools.add_argument("--upstream-policy", choices=POLICIES,
                       help="how a pool picks a request's upstream (default prefix_affinity: one conversation prefix, "
                            "one upstream, within 1.25x the mean load)")
    pools.add_argument("--pools-file", type=Path, default=os.environ.get("MISTRAL_SERVE_POOLS_FILE"),
                       help="a YAML or TOML file of pools, with every option (env MISTRAL_SERVE_POOLS_FILE)")
    storage_flags(serve)
    serve.set_defaults(run=run_serve)

    engine = commands.add_parser("engine", help="serve our engine alone, for a gateway's pool: chat and models "
                                                 "under /v1 for holders of a shared token, /health and /metrics; "
                                                 "no accounts, no database")
    engine_flags(engine, serves_many_models=True)
    engine.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    engine.add_argument("--port", type=int, default=ENGINE_PORT, help=f"port to listen on (default {ENGINE_PORT})")
    engine.add_argument("--token-file", type=Path,
                        help=f"a file holding the token callers must send as `Authorization: Bearer TOKEN` (default: "
                             f"${ENGINE_TOKEN_VARIABLE}; one of them is required unless --host is a loopback address)")
    engine.add_argument("--allowed-hosts", help="comma-separated names answered in the Host header (default: any; "
                                                "the token guards the engine)")
    engine.add_argument("--max-queued-requests", type=int, help="requests waiting to start before new ones get 503")
    engine.add_argument("--queue-timeout", dest="queue_timeout_s", type=float,
                        help="seconds a request may wait to start before it gets 503 (default 120)")
    engine.add_argument("--shutdown-timeout", dest="shutdown_timeout_s", type=float,
                        help="on SIGTERM, seconds in-flight requests may take to finish (default 30)")
    engine.set_defaults(run=run_engine)

    add_admin_commands(commands)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    from mistral_serve.api.app import create_app
    from mistral_serve.catalog import parse_model_spec

    settings = settings_from(args)
    log_requests()
    db = open_database(settings)
    pooled = load_pools(args, settings)
    # before any weights load: an id is served by this process or by a pool, not both
    if both := {parse_model_spec(spec)[0] for spec in args.models} & pooled.keys():
        raise ValueError(f"{', '.join(sorted(both))}: given both as --model and as a pool")
    # a gateway in front of pools runs no engine of its own unless told to with --model
    engines = load_engines(settings, args.models) if args.models or not pooled else {}
    app = create_app(settings, {**engines, **pooled}, db)
    may_warn_of_refused_hosts(settings)
    describe_signup(settings, db)
    return run_app(app, settings, engines)


def run_engine(args: argparse.Namespace) -> int:
    from mistral_serve.api.engine_app import create_engine_app

    settings = settings_from(args)
    log_requests()
    token = engine_token(args.token_file, settings.host)
    engines = load_engines(settings, args.models)
    # a gateway keeps its connections to the engine for seconds between requests: hold them longer than it
    return run_app(create_engine_app(settings, engines, token), settings, engines, keep_alive_s=ENGINE_KEEP_ALIVE_S)


def load_pools(args: argparse.Namespace, settings: Settings) -> dict:
    """A pooled model per pool of --upstream flags and of the --pools-file, its tokenizer loaded."""
    from mistral_serve.api.pooled_model import pooled_model
    from mistral_serve.upstream.config import load_pools_file, pools_from_flags

    specs = pools_from_flags(args.upstreams, policy=args.upstream_policy, token_env=args.upstream_token_env)
    if args.pools_file:
        specs += load_pools_file(args.pools_file)
    pooled = {}
    for spec in specs:
        if spec.model_id in pooled:
            raise ValueError(f"the pool of {spec.model_id} is given twice")
        pooled[spec.model_id] = pooled_model(spec, allow_download=bool(settings.allow_download))
        print(f"{spec.model_id}: a pool of {len(spec.upstreams)} upstream(s), {spec.policy}: "
              f"{', '.join(upstream.name for upstream in spec.upstreams)}", file=sys.stderr)
    return pooled


def engine_token(token_file: Path | None, host: str) -> str | None:
    """The engine's shared token: from --token-file, else the environment; required off loopback."""
    token = token_file.read_text().strip() if token_file else os.environ.get(ENGINE_TOKEN_VARIABLE, "").strip()
    if token:
        return token
    if token_file:
        raise ValueError(f"--token-file {token_file} is empty")
    if host not in LOOPBACK_NAMES:
        raise ValueError(f"an engine listening on {host or 'every interface'} needs a token: set "
                         f"{ENGINE_TOKEN_VARIABLE} or --token-file (gateways send it as a Bearer token)")
    log.warning("no %s: any process on this machine may call this engine", ENGINE_TOKEN_VARIABLE)
    return None


def log_requests() -> None:
    """Our log lines beside uvicorn's, in its format: one per chat request (its id, outcome and tokens)."""
    logging.basicConfig(format="%(levelname)s:     %(name)s: %(message)s")
    logging.getLogger("mistral_serve").setLevel(logging.INFO)


def load_engines(settings: Settings, model_flags: list[str]) -> dict:
    """An engine per --model ID=PATH (default: the demo model and the cached Mistral models), loaded."""
    from mistral_serve.catalog import card_for, default_model_specs, parse_model_spec
    from mistral_serve.engine.async_engine import load_async_engine
    from mistral_serve.engine.builder import resolve_threads

    num_threads = resolve_threads(settings.threads)
    specs = [parse_model_spec(spec) for spec in model_flags] or default_model_specs()
    engines = {}
    for model_id, source in specs:
        if model_id in engines:
            raise ValueError(f"--model {model_id} is given twice")
        print(f"loading {model_id} from {source}", file=sys.stderr)
        # a known model is served up to its documented context, never beyond
        max_model_len = settings.max_model_len or card_for(model_id).context_length
        model_settings = settings.model_copy(update={"model": source, "max_model_len": max_model_len})
        engines[model_id] = load_async_engine(model_settings, num_threads)
        print(f"{model_id}: {engines[model_id].backend.describe()}", file=sys.stderr)
    return engines


def run_app(app, settings: Settings, engines: dict, keep_alive_s: float = 5) -> int:
    """`app` under uvicorn with a graceful shutdown (api/server.py), until a signal stops it."""
    import uvicorn

    from mistral_serve.api.server import ABORT_GRACE_S, GracefulServer

    # uvicorn would believe X-Forwarded-* from 127.0.0.1 (or $FORWARDED_ALLOW_IPS) unless told: only the named proxies
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_keep_alive=keep_alive_s, timeout_graceful_shutdown=ABORT_GRACE_S,
                            proxy_headers=bool(settings.forwarded_allow_ips),
                            forwarded_allow_ips=list(settings.forwarded_allow_ips))
    try:
        GracefulServer(config, app.state.serving).run()
    finally:  # a forced exit skips the app's shutdown; the process ends only once its engine threads do
        for engine in engines.values():
            engine.shutdown()
    return 0


def may_warn_of_refused_hosts(settings: Settings) -> None:
    """Listening on every interface while answering loopback names only: say so before clients get 400."""
    if settings.host in ANY_ADDRESS and set(settings.resolved_allowed_hosts) <= set(LOOPBACK_NAMES):
        log.warning("listening on %s, but requests are answered only when their Host is one of %s: set "
                    "--allowed-hosts (MISTRAL_SERVE_ALLOWED_HOSTS) to the names clients use",
                    settings.host or "every interface", ", ".join(settings.resolved_allowed_hosts))


def describe_signup(settings: Settings, db) -> None:
    """Say who may open an account; warn when anyone may, beyond this machine, with no plan to hold them."""
    from mistral_serve.db import plans

    mode = settings.signup_mode
    print(f"sign-up: {mode}" + ("" if settings.signup else " (the default for this --host; --signup to choose)"),
          file=sys.stderr)
    with db() as session:
        has_default_plan = plans.default_plan(session) is not None
    if mode == "open" and settings.host not in LOOPBACK_NAMES and not has_default_plan:
        log.warning("anyone who reaches this server may open an account, and new accounts have no plan to limit "
                    "them: make one with `mistral-serve plans create NAME --default …`")


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from mistral_serve.engine.builder import build_engine, resolve_threads
    from mistral_serve.engine.params import SamplingParams

    settings = settings_from(args)
    torch.set_num_threads(resolve_threads(settings.threads))
    engine = build_engine(settings)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.message})
    prompt = engine.tokenizer.encode_chat(messages)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    engine.add_request("cli", prompt, params)
    started, first_token_at, num_tokens, reason = time.perf_counter(), None, 0, None
    while engine.has_unfinished_requests():
        for delta in engine.step():
            first_token_at = first_token_at or time.perf_counter()
            num_tokens += len(delta.token_ids)
            reason = delta.finish_reason or reason
            print(delta.text, end="", flush=True)
    elapsed = time.perf_counter() - started
    decode_time = elapsed - (first_token_at - started) if first_token_at else 0.0
    rate = (num_tokens - 1) / decode_time if num_tokens > 1 and decode_time > 0 else 0.0
    print(f"\n[{len(prompt)} prompt tokens, {num_tokens} generated, finish: {reason}, "
          f"first token {first_token_at - started:.2f} s, {rate:.1f} tokens/s]", file=sys.stderr)
    print(f"[{engine.backend.describe()}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # bad settings or checkpoints: one clear line, no traceback
        print(f"mistral-serve: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
