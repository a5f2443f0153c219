"""What goes wrong around the serving cluster, and what the server does then: `llumnix serve` refusing to start (a port
taken, too few CPUs) before any actor starts.

One local Ray (2 CPUs) for the module.
"""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner

from llumnix.cli import main

pytestmark = pytest.mark.timeout(300)


def one_error_line(result) -> str:
    """``llumnix serve`` failed with click's one-line error (no traceback); that line."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    return errors[0]


# -- llumnix serve: checks before anything starts ----------------------------------------------------------------------
def test_serve_refuses_a_taken_port_or_a_foreign_host_before_ray_starts(monkeypatch):
    import llumnix.runtime.frontend as frontend

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the port check")

    monkeypatch.setattr(frontend, "init_ray", no_ray)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--backend", "profile", "--port", str(port)])
    line = one_error_line(result)
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in line and "choose a free --port" in line, line
    result = CliRunner().invoke(main, ["serve", "--backend", "profile", "--host", "198.51.100.231", "--port", "0"])
    line = one_error_line(result)  # TEST-NET-2 (documentation): no address of this machine
    assert line.startswith("Error: --host 198.51.100.231: cannot bind") and "use an address of this machine" in line


def test_serve_refuses_more_cpus_than_ray_has_before_any_actor_starts(ray_local, monkeypatch):
    from llumnix.runtime.cluster import ClusterManager

    launched = []
    monkeypatch.setattr(ClusterManager, "launch_actor", lambda self, iid: launched.append(iid))
    args = ["serve", "--backend", "profile", "--port", "0", "--instances", "3", "--num-cpus-per-instance", "1"]
    line = one_error_line(CliRunner().invoke(main, args))
    assert "3 --instances x 1 CPU (--num-cpus-per-instance) = 3 CPU, but the Ray cluster has 2" in line, line
    assert "use fewer --instances or a smaller --num-cpus-per-instance" in line
    assert launched == [] and ray_local.is_initialized()  # no actor; the Ray it did not start is left running

