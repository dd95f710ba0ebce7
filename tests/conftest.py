from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from tests.helpers import Backend, CaddyProcess, Daemon, Responder, Service


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """A test that runs the CLI in process configures structlog to write to that test's captured stderr;
    later tests must not log into that closed stream."""
    yield
    structlog.reset_defaults()


@pytest.fixture
def backends() -> Iterator[Callable[[str], Backend]]:
    started: list[Backend] = []

    def make(name: str) -> Backend:
        b = Backend(name)
        started.append(b)
        return b

    yield make
    for b in started:
        b.close()


@pytest.fixture
def caddy(tmp_path: Path) -> Iterator[CaddyProcess]:
    proc = CaddyProcess(tmp_path / "caddy")
    yield proc
    proc.stop()


@pytest.fixture
def responder(tmp_path: Path) -> Iterator[Responder]:
    proc = Responder(tmp_path / "dns")
    yield proc
    proc.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[Daemon] = []

    def make(**kwargs: object) -> Daemon:
        d = Daemon(tmp_path, **kwargs)  # type: ignore[arg-type]
        made.append(d)
        return d

    yield make
    failures: list[BaseException] = []
    for d in made:  # every daemon stopped, even when the guard fails on one of them
        try:
            d.cleanup()
        except Exception as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


@pytest.fixture
def services() -> Iterator[Callable[[str], Service]]:
    made: list[Service] = []

    def make(name: str) -> Service:
        s = Service(name)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
