"""Which Ray cluster the project's processes use, and waiting for a fresh head's job agent.

Rules (issue 18): the project's Ray connects only to a cluster it was given (``--address`` / $RAY_ADDRESS) or
one it starts itself (``address="local"``, never ``ray.init()``'s auto-detection, which attaches to whatever
``ray start`` cluster the machine runs). Once connected, every process of that cluster must know the address:
Ray Train's controller and its ``PlacementGroupCleaner`` query the State API with no address
(``ray.util.state.get_actor`` -> ``get_address_for_submission_client(None)``), which reads $RAY_ADDRESS and
otherwise auto-detects, and dies with "Found multiple active Ray instances" when another Ray runs on the
machine; a trial stopped by ASHA then keeps its placement group and the next trials wait forever. So the
address goes into the job's runtime environment (every worker, actor and Train controller inherits it) and
into this process's environment (for its subprocesses).

No import of Ray at module level: the CLI imports this before deciding whether Ray is needed.
"""
from __future__ import annotations

import os
import socket
import time

ADDRESS_ENV = "RAY_ADDRESS"
# Ray reads the GCS port of a head it starts from this variable (ray._private.node): a port chosen here is an
# address known before the workers start, so it can be put into their environment.
_GCS_PORT_ENV = "RAY_GCS_SERVER_PORT"
_exported: str | None = None  # the address this process exported (not one the user gave)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _with_address(kwargs: dict, address: str) -> dict:
    """ray.init kwargs with RAY_ADDRESS=address added to the job's runtime environment."""
    runtime_env = dict(kwargs.get("runtime_env") or {})
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), ADDRESS_ENV: address}
    return {**kwargs, "runtime_env": runtime_env}


def given_address(address: str | None = None) -> str | None:
    """The cluster the user gave (argument, else $RAY_ADDRESS unless it is one this process exported for a
    Ray it started and has since shut down), or None: start a new local Ray."""
    if address:
        return address
    env = os.environ.get(ADDRESS_ENV) or None
    return None if env is not None and env == _exported else env


def _canonical(address: str) -> str | None:
    """host:port of a bootstrap address (what ray.init connects to), None for a Ray Client address."""
    if address.startswith("ray://"):
        return None
    from .compat import canonical_bootstrap_address

    return canonical_bootstrap_address(address)


def start_or_connect(address: str | None = None, **kwargs):
    """Connect to the given cluster or start a local one; export its address (see the module docstring).
    Returns ray.init's context when a local Ray was started here (the caller shuts it down), else None."""
    global _exported
    import ray

    if ray.is_initialized():  # the caller's Ray: its address for our subprocesses, unless the caller gave one
        if not os.environ.get(ADDRESS_ENV):
            _exported = export_address()
        return None
    target = given_address(address)
    if target:
        canonical = _canonical(target)
        ray.init(address=target, **(_with_address(kwargs, canonical) if canonical else kwargs))
        started = None
    else:
        port = _free_port()
        planned = f"{ray.util.get_node_ip_address()}:{port}"
        os.environ[_GCS_PORT_ENV] = str(port)
        try:
            started = ray.init(address="local", **_with_address(kwargs, planned))
        finally:
            os.environ.pop(_GCS_PORT_ENV, None)
    exported = export_address()
    if not target:
        _exported = exported
    return started


def shutdown() -> None:
    """Shut down the Ray this process started, and take its address back out of $RAY_ADDRESS (a subprocess
    started later would try to connect to the dead cluster)."""
    global _exported
    import ray

    ray.shutdown()
    if _exported is not None and os.environ.get(ADDRESS_ENV) == _exported:
        del os.environ[ADDRESS_ENV]
    _exported = None


def export_address() -> str:
    """Put the connected cluster's GCS address into $RAY_ADDRESS of this process (its subprocesses)."""
    import ray

    address = ray.get_runtime_context().gcs_address
    os.environ[ADDRESS_ENV] = address
    return address


def wait_for_job_agent(address: str, timeout_s: float = 180.0, poll_s: float = 2.0) -> float:
    """Block until the cluster at `address` (its dashboard, ``http://host:port``) accepts job submissions.

    Right after ``ray start --head`` the dashboard answers before its job agent registers, and
    ``ray job submit`` fails with "No available agent to submit job". This submits a no-op job until one is
    accepted and has finished (bounded by `timeout_s`), and returns the seconds waited. TimeoutError after.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    t0 = time.time()
    deadline = t0 + timeout_s
    last = ""
    while time.time() < deadline:
        try:
            client = JobSubmissionClient(address)
            job = client.submit_job(entrypoint="true")
            while time.time() < deadline:
                if client.get_job_status(job) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                    return time.time() - t0
                time.sleep(poll_s)
        except (OSError, RuntimeError) as err:  # the agent / dashboard is not up yet (requests errors are OSErrors)
            last = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        time.sleep(poll_s)
    raise TimeoutError(f"the Ray cluster at {address} accepted no job within {timeout_s:.0f} s (last: {last}); "
                       "if its dashboard_agent.log says 'address already in use', another Ray on the host holds "
                       "the agent's port: start the head with --dashboard-agent-listen-port=<a free port>")


if __name__ == "__main__":  # an alias of `python -m sweeps wait-for-jobs`
    from sweeps.cli import alias

    alias("")
