"""Fixtures of the black-box client suite: servers under test, one process per
test (or per iteration), started from $PUBSUB_BIN (default
target/release/pubsub-backend, relative to the repository) and killed at the
end whatever happened. A failing test shows the server's stderr."""

import os

import pytest

from clientlib import Server, binary_path


def pytest_configure(config):
    path = binary_path()
    if not os.access(path, os.X_OK):
        raise pytest.UsageError(
            f"no server binary at {path}: build it (cargo build --release) or set PUBSUB_BIN"
        )


@pytest.fixture
def start_server():
    """start_server(NAME=VALUE, ...) -> Server: a fresh server with these settings."""
    servers = []

    def start(**settings):
        server = Server(**settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()
        # Shown by pytest only when the test failed.
        print(f"--- server pid {server.pid} {server.settings} stderr (last 40 lines):")
        for _, line in server.snapshot_lines()[-40:]:
            print(line)
