"""Connect to Ray: an existing cluster when an address is given (or RAY_ADDRESS is set), else a local in-process Ray."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings

import ray
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR  # Ray is pinned to 2.60.x
from ray.train import LoggingConfig, ScalingConfig, TrainingFailedError

from ptray.config import Config, cluster_host_port
from ptray.errors import ConfigError, StartupError, UserError
from ptray.worker_setup import quiet_ray_process


@contextlib.contextmanager
def ray_session(cfg: Config):
    """Initialize Ray for a ptray command and shut it down afterwards (unless Ray was already running here)."""
    quiet_libraries()
    if ray.is_initialized():
        yield
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else Train V2 echoes every worker print twice
                # Ray Train's controller collects a worker's report once per poll (2 s by default) and a worker's
                # next report waits for that: a finetune run reporting every few steps spent 17 of its 20 s in
                # the loop waiting (0.2 s with this). A poll is one small call per worker.
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")}
    if verbose():
        env_vars["PTRAY_VERBOSE"] = "1"  # sweep trials build their own Ray Train runs: they need to know too
    if not cfg.cluster.use_gpu:
        env_vars["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator (gloo) instead of probing for CUDA
    # Inside `ray job submit` the job's runtime_env may set some of these already, and Ray refuses to merge duplicates.
    job_env_vars = _job_runtime_env().get("env_vars") or {}
    runtime_env = {"env_vars": {k: v for k, v in env_vars.items() if k not in job_env_vars}}
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise UserError(f"cannot connect to the Ray cluster at {address!r}: {e}. If the cluster uses token "
                            "authentication (Ray 2.60 turns it on for `ray start`), set RAY_AUTH_MODE=token; the token "
                            "is read from ~/.ray/auth_token or RAY_AUTH_TOKEN.") from None
    else:
        # Local test mode: Ray Train reserves whole CPUs for its workers and Ray Data may only use what is left, so
        # advertise a few logical CPUs beyond the workers' share (threads are what actually share the cores): on 2
        # cores, 5 fit two concurrent sweep trials of 2 workers plus their drivers' 0.01 CPU each.
        needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
        num_cpus = int(max(os.cpu_count() or 1, needed)) + 3
        # Concurrent sweep trials oversubscribe the cores, and a worker's start (importing torch and DeepSpeed) can
        # then take longer than Ray Train's 60 s default for starting a worker group.
        runtime_env["env_vars"].setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
        # One machine is never preempted: no watcher actor per Train run (one process fewer to start for every run
        # and sweep trial, about 5 s each on 2 cores, and no start-up warning of its own on the console).
        runtime_env["env_vars"].setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # The raylet starts at most this many worker processes at a time and warns on the console once 4x as many are
        # alive; Ray caps it at the cores (2 here), below the logical CPUs it prestarts workers for, so every sweep
        # printed "WARNING: 8 PYTHON worker processes have been started ..." for processes it was asked to run.
        runtime_env["env_vars"].setdefault("RAY_worker_maximum_startup_concurrency", str(num_cpus))
        # Ray Train's placement-group cleaner finds "its" cluster by auto-detection, which fails as soon as a second Ray
        # runs on this machine (another ptray, a test): the next trial's workers then never start. So the GCS gets a
        # port chosen here, and every worker of this session is told the address.
        gcs_port = _free_port()
        runtime_env["env_vars"]["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{gcs_port}"
        # The settings reach Ray's processes through the environment they inherit from this one (Ray's own processes
        # start from here, its workers from them), not through a job runtime_env: Ray's idle workers have none, and
        # a job that has one can use none of them, so each of its first tasks waited for a fresh process (prepare
        # of 1,513 manual pages: 4.3 s -> 3.4 s without, when Ray still prestarted workers).
        inherited = {**runtime_env["env_vars"], "RAY_GCS_SERVER_PORT": str(gcs_port)}
        if not verbose():  # the setup hook by module path, as runtime_env's worker_process_setup_hook passes it on
            hook = quiet_ray_process
            inherited[WORKER_PROCESS_SETUP_HOOK_ENV_VAR] = f"{hook.__module__}.{hook.__name__}"
        saved = {key: os.environ.get(key) for key in inherited}
        os.environ.update(inherited)
        # A local cluster gets token authentication (Ray 2.60's default), and Ray announces it on the console.
        auth_notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
        auth_notice.setLevel(logging.ERROR)
        try:
            # address="local": always a fresh in-process Ray, even if a `ray start` cluster runs on this machine.
            # Keep the dashboard (about 1.5 s of the start): Ray Train's placement-group cleaner asks the State API,
            # which it serves, whether a run's controller still lives. Without it a finished sweep trial's workers'
            # CPUs were never given back, and the next trials waited for them forever (CI hung so).
            # No prestarted workers: Ray starts one per logical CPU as the driver connects (5 on 2 cores, with the
            # start-up concurrency raised above), each importing Ray and running the setup hook beside the command's
            # own start, and most commands use few of them (Ray Train's controller and workers have a runtime_env
            # and can use none). Started on demand, the manual pages' prepare took 2.4 s less as a whole command.
            ray.init(address="local", num_cpus=num_cpus, logging_level=logging.WARNING,
                     _system_config={"prestart_worker_first_driver": False})
        finally:
            for key, value in saved.items():
                if value is None:
                    del os.environ[key]
                else:
                    os.environ[key] = value
            auth_notice.setLevel(logging.NOTSET)
    # Ray Train reads these in the driver too (and hands them to its controller and workers).
    for key in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        if key in runtime_env["env_vars"]:
            os.environ.setdefault(key, runtime_env["env_vars"][key])
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    # Ray 2.60's new Parquet reader starts 32 footer-reading actors for every read_parquet: 13 s to read 5 small files
    # on 2 cores, against 0.4-2 s with the previous reader (measured), and prepare reads Parquet three times.
    data_context.use_datasource_v2 = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one line per dataset execution is noise here
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled": we know
    try:
        yield
    finally:
        ray.shutdown()


def verbose() -> bool:
    """`--verbose`: Ray Train's and Tune's own progress messages (worker groups starting, checkpoints reported, the
    trial table) reach the console too. Without it they are only in Ray's log files (/tmp/ray/session_latest/logs),
    and the console shows ptray's lines."""
    return os.environ.get("PTRAY_VERBOSE") == "1"


def quiet_libraries() -> None:
    """Without --verbose, the console shows ptray's lines, not the libraries' (those stay in Ray's log files).
    Called in the driver and in every worker."""
    if verbose():
        return
    import transformers

    # Ray Train logs every report at INFO through a logger named by its file path, outside the `ray.train` logger
    # that its LoggingConfig(log_level=...) filters (Ray 2.60), so "Reporting training result ..." reaches the console.
    with contextlib.suppress(ImportError, AttributeError):
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    # torch's deprecation notices for the collectives DeepSpeed calls: nothing a ptray user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is (deprecated|a private function)",
                            category=FutureWarning)
    # Tune's experiment header (search algorithm, scheduler, "View detailed results here") prints whatever its
    # verbosity; its older reporter at verbosity 0 prints nothing. ptray's sweep prints its own summary.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Load reports ("score.weight | MISSING": a new classification head, as expected) and progress bars.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def exit_at_once_if_torn_down() -> None:
    """Called on a Train worker's training thread. When Ray tears the worker down mid-step (Tune stopping a trial
    early, a run whose controller died), Python's shutdown would stop this daemon thread inside a torch op and the
    process would abort, printing a "Fatal Python error: Aborted" stack for a normal stop. Exit before that."""
    training_thread = threading.current_thread()

    def exit_now() -> None:
        if training_thread.is_alive():
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(1)

    atexit.register(exit_now)


@contextlib.contextmanager
def quiet_prints():
    """DeepSpeed announces some steps with bare prints and progress bars (a CPU op loaded, a checkpoint
    consolidated): without --verbose, these stay off the console. Logging and exceptions pass as usual."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def train_logging() -> LoggingConfig:
    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def fit_with_retries(build_trainer, *, max_failures: int, label: str):
    """`build_trainer().fit()`, restarted from the latest checkpoint after a failure once training had started, at
    most `max_failures` times (-1: no limit). The trainers get no retries of their own (FailureConfig(max_failures=0)):
    Ray Train would restart on any error, also on one raised before the first optimizer step (an import, an op build,
    a config or shape error), which can only repeat. Such an error stops the run at once: a UserError with its message
    (exit 2), anything else as a RuntimeError with the worker's traceback (a bug: exit 1)."""
    failures = 0
    while True:
        try:
            return build_trainer().fit()
        except TrainingFailedError as e:
            errors = [getattr(f, "_base_exc", f) for f in (getattr(e, "worker_failures", None) or {}).values()]
            if errors and all(isinstance(f, StartupError) for f in errors):
                first = errors[0]
                if first.user_error:
                    raise UserError(first.message) from None
                raise RuntimeError(f"{label}: a worker failed before its first optimizer step, so the run stops "
                                   "without a retry (it would fail the same way again):\n"
                                   f"{first.traceback_text}") from None
            if 0 <= max_failures <= failures:
                raise
            failures += 1
            print(f"[{label}] training failed ({str(e).strip().splitlines()[-1][:300]}); restarting the workers from "
                  f"the latest checkpoint (retry {failures} of {max_failures if max_failures >= 0 else 'unlimited'})",
                  flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _job_runtime_env() -> dict:
    """The runtime_env of the `ray job submit` this driver runs in ({} outside a job)."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return job_config.get("runtime_env") or {}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail within seconds, naming the address, when no Ray cluster answers there (ray.init would retry for minutes)."""
    fix = ("Start one (`ray start --head`, or `bash cluster/local_cluster.sh start`) or fix --address / RAY_ADDRESS "
           "(host:port of the head's GCS, default port 6379, or ray://host:10001 for Ray Client).")
    target = cluster_host_port(address)
    if target is None:
        return  # auto / local: ray.init resolves these itself and fails fast
    host, port = target
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {address!r} ({host}:{port}: {e.strerror or e}). "
                        f"{fix}") from None


def worker_scaling(cfg: Config, driver_cpus: float = 0.0) -> ScalingConfig:
    """The workers' ScalingConfig, after checking the cluster can ever place them, beside `driver_cpus` held by what
    drives them (a sweep trial's own share), and can give them back (check_state_api).

    Ray would otherwise wait silently for resources that do not exist (GPUs on a CPU cluster, or 2 workers x 1 CPU
    plus a trial's 0.01 CPU on a 2-CPU head). An autoscaling cluster gets `cluster.wait_for_nodes_s` to grow.
    """
    check_state_api()
    c = cfg.cluster
    bundle = {"CPU": c.cpus_per_worker, **({"GPU": 1.0} if c.use_gpu else {})}
    deadline = time.monotonic() + c.wait_for_nodes_s
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        placeable = placeable_workers(nodes, bundle, c.placement_strategy, driver_cpus)
        if placeable >= c.num_workers:
            return ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                 resources_per_worker={"CPU": c.cpus_per_worker},
                                 placement_strategy=c.placement_strategy)
        if time.monotonic() >= deadline:
            break
        time.sleep(5)
    have = ", ".join(f"node {i}: {node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU"
                     for i, node in enumerate(nodes))
    need = " + ".join(f"{v:g} {k}" for k, v in bundle.items())
    driver = f", beside {driver_cpus:g} CPU for each sweep trial itself" if driver_cpus else ""
    raise ConfigError(
        f"the cluster cannot place {c.num_workers} workers of {need} each with placement "
        f"{c.placement_strategy}{driver} (it fits {placeable}; {have}). Lower cluster.num_workers or "
        "cluster.cpus_per_worker (e.g. cluster.cpus_per_worker=0.9 leaves room for a trial)"
        f"{', set cluster.use_gpu=false' if c.use_gpu else ''}, use another "
        "cluster.placement_strategy, add nodes, or give an autoscaling cluster time with cluster.wait_for_nodes_s.")


def check_state_api() -> None:
    """Ray Train gives back the CPUs and GPUs of a run whose controller ended abruptly (a sweep trial that ASHA stops,
    a driver stopped with Ctrl-C) only once Ray's State API, which the cluster's dashboard serves, says the controller
    is gone. Without it the next runs wait for those resources forever, silently: say so before any run starts."""
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:  # this cluster's, not whichever Ray another process runs on this machine
        list_actors(address=ray.get_runtime_context().gcs_address, limit=1, raise_on_missing_output=False)
    except (RayStateApiException, ValueError, ConnectionError) as e:
        raise UserError(
            f"the Ray cluster does not answer Ray's State API ({str(e).split('. ')[0]}): its dashboard is not "
            "running (a head started with --include-dashboard=false, or from an image without ray[default]). Ray "
            "Train asks it before giving back the resources of a run that ended abruptly (every sweep trial that "
            "ASHA stops), and without it the next runs would wait for them forever. Start the head node with the "
            "dashboard (the default of `ray start --head` with ray[default] installed).") from None


def placeable_workers(nodes: list[dict], bundle: dict, strategy: str, driver_cpus: float = 0.0) -> int:
    """How many worker bundles these nodes' resources hold under a placement strategy, with `driver_cpus` taken from
    whichever node leaves the most room."""
    best = 0
    for driver_node in range(len(nodes)) if driver_cpus else [None]:
        per_node = []
        for i, node in enumerate(nodes):
            free = {k: node.get(k, 0.0) - (driver_cpus if k == "CPU" and i == driver_node else 0.0) for k in bundle}
            per_node.append(int(min(max(free[k], 0.0) // v for k, v in bundle.items())))
        if strategy == "STRICT_SPREAD":
            best = max(best, sum(1 for n in per_node if n > 0))
        elif strategy == "STRICT_PACK":
            best = max(best, max(per_node, default=0))
        else:
            best = max(best, sum(per_node))
    return best
