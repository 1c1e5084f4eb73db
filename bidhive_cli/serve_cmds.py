"""`bidhive serve`: run the HTTP service on an embedded local Ray (or RAY_ADDRESS)."""
from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from bidhive_cli.errors import UserError, exit_143_when_terminated, file_in_the_way, warnings_as_lines

if TYPE_CHECKING:
    from serve.config import ServeCfg


def _preflight(journal: str) -> None:
    """Fails in one line, before Ray starts, on a journal the service could not continue."""
    from market.journal import JournalError, JournalLocked, JournalWriter

    path = Path(journal)
    blocked = file_in_the_way(path)
    if blocked is not None:
        raise UserError(f"journal {path}: {blocked} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            with warnings_as_lines():
                JournalWriter(path).close()  # recovers a torn tail, proves the lock is free
        else:
            _can_create_in(path.parent)
    except JournalLocked:
        raise UserError(f"journal {path} is in use by another bidhive process") from None
    except JournalError as err:
        raise UserError(f"journal {path}: {err}") from None
    except OSError as err:
        raise UserError(f"journal {path}: {err.strerror or err}") from None


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # the ones the error names


def _can_create_in(folder: Path) -> None:
    """Fails in one line where the replica could not create the journal."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".bidhive-probe-"):
            pass
    except OSError as err:
        raise UserError(f"cannot create the journal in {folder}: {err.strerror or err}") from None


#: How long `bidhive serve` waits for a port that only closing connections hold (TCP's
#: TIME_WAIT lasts a minute on Linux).
PORT_WAIT_S = 70.0


def _claim_port(host: str, port: int) -> None:
    """Fails in one line, before Ray starts, on a port another process listens on; waits
    for one that only the closing connections of a service stopped moments ago hold."""
    from serve.runner import bind_error, listening, wait_port_free

    err = bind_error(host, port)
    if err is None:
        return
    if err.errno != errno.EADDRINUSE:
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}")
    if listening(host, port):
        raise UserError(f"{host}:{port} is in use; pick another with --port")
    typer.echo(f"bidhive: {host}:{port} is held by the closing connections of a service stopped moments ago; "
               f"waiting for them (up to {PORT_WAIT_S:.0f} s)", err=True)
    if not wait_port_free(host, port, PORT_WAIT_S):
        raise UserError(f"{host}:{port} is still held by connections, though nothing listens there; "
                        "pick another with --port")


def _check_names(cfg: ServeCfg) -> None:
    """The fleet, policy and profile the service would load, checked before Ray starts: a
    misspelt name is one line at once, not a service that fails to start a minute later."""
    from market.config import load_fleet, load_profile
    from policies.registry import make_policy

    load_fleet(cfg.fleet)
    load_profile(cfg.profile)
    if cfg.policy.startswith("rl:"):
        if not Path(cfg.policy[3:]).is_file():  # the bidders fall back, as they do in `simulate`
            typer.echo(f"bidhive: policy file {cfg.policy[3:]} not found: the bidders bid with the heuristic",
                       err=True)
    else:
        make_policy(cfg.policy)


def serve(
    config: Annotated[Optional[Path], typer.Option(help="Serve config (default: configs/serve.yaml).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port (default 8000).")] = None,
    fleet: Annotated[Optional[str], typer.Option(help="Fleet name (configs/fleets) or YAML path.")] = None,
    policy: Annotated[Optional[str], typer.Option(help="static, truthful, heuristic or rl:PATH.")] = None,
    bidders: Annotated[Optional[str], typer.Option(help="ray (an actor per resource) or local.")] = None,
    journal: Annotated[Optional[str], typer.Option(help="Journal file (continued if it exists).")] = None,
) -> None:
    """Serve the order API on an embedded local Ray (or RAY_ADDRESS) until Ctrl-C."""
    from serve.config import load_serve_cfg, with_env_token
    from serve.runner import ServiceStartError, run_service

    cfg, listen = load_serve_cfg(config, host=host, port=port, fleet=fleet, policy=policy, bidders=bidders, journal=journal)
    cfg = with_env_token(cfg)  # here, so a bad one is one line before Ray starts
    _check_names(cfg)
    level = os.environ.get("BIDHIVE_LOG", "WARNING").upper()
    if not isinstance(logging.getLevelName(level), int):  # every name logging takes (WARN, NOTSET too)
        raise UserError(f"BIDHIVE_LOG: unknown level '{level}' (known: {', '.join(LOG_LEVELS)})")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from runtime.local_ray import clear_killed_sessions, embedded_requested

    if embedded_requested():
        clear_killed_sessions()  # a killed service's replica may still hold the journal (and the port)
    _claim_port(listen.host, listen.port)  # first: the journal's check cuts a torn tail, a change to keep for a start
    _preflight(cfg.journal)
    # Serve's own start-up lines name its proxy's port ("ready at http://127.0.0.1:29806/"),
    # not the one bidhive serves on; they show at BIDHIVE_LOG=INFO. Importing Serve sets
    # its logger up, so the level is set after that.
    import ray.serve  # noqa: F401

    logging.getLogger("ray.serve").setLevel(level)
    try:
        with exit_143_when_terminated():
            run_service(cfg, listen, say=typer.echo)
    except ServiceStartError as err:  # not the user's mistake (exit 1), but one readable line all the same
        typer.echo(f"bidhive: {err}", err=True)
        raise typer.Exit(1) from None
