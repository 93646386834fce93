"""Cluster operation against a real two-node Ray cluster on 127.0.0.1 (`ray start`), as users run it:
`ray job submit` of the pipeline, training workers spread over both nodes, and fast, clear errors.

The cluster is started once for the module and stopped at the end (loopback only; token auth as Ray 2.60 sets it up).
Every client runs in a subprocess with RAY_AUTH_MODE=token: Ray reads the auth mode once per process.
"""

import contextlib
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import free_port
from ptray.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_FAST = ["data.builtin_docs=2000", "pretrain.max_steps=10", "pretrain.log_every=5", "pretrain.eval_every=10",
            "pretrain.ckpt_every=10", "finetune.builtin_examples=200", "finetune.epochs=1", "sweep.num_samples=1",
            "sweep.scheduler=none", "sweep.compare_scratch=false", "sweep.num_seeds=0", "sweep.label_fractions=[1.0]",
            "sweep.pretrained_steps=[]"]



def _run(*args, timeout=600, **kwargs):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kwargs)


def _node_processes(temp_dir: str) -> list[int]:
    """The processes of the node started with `--temp-dir temp_dir` (raylet, agents) and everything below them (its
    Ray workers, whose command lines Ray rewrites)."""
    parents, roots = {}, []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            parents[int(pid)] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
        if temp_dir in cmdline and "ray start" not in cmdline:
            roots.append(int(pid))
    found, todo = set(roots), list(roots)
    while todo:
        parent = todo.pop()
        for child in [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]:
            found.add(child)
            todo.append(child)
    return sorted(found)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a second node, 2 CPUs each, on 127.0.0.1; the client side uses the cluster's token. Each node has its
    own temp dir, so the teardown stops exactly these processes (`ray stop` would stop every Ray on the machine)."""
    port, dashboard_port = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # clients of the cluster, all in subprocesses
    head_temp_dir, node2_temp_dir = str(tmp_path_factory.mktemp("head")), str(tmp_path_factory.mktemp("node2"))
    try:
        # On a machine where Ray never ran there is no ~/.ray/auth_token yet: `ray start` wants one, as users are told.
        token = _run("ray", "get-auth-token", "--generate", env=env)
        assert token.returncode == 0, token.stderr[-2000:]
        head = _run("ray", "start", "--head", "--temp-dir", head_temp_dir, "--node-ip-address", "127.0.0.1",
                    "--port", str(port),
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--num-cpus", "2",
                    "--disable-usage-stats", env=env)
        assert head.returncode == 0, head.stderr[-2000:]
        node = _run("ray", "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                    "--num-cpus", "2", "--temp-dir", node2_temp_dir, "--disable-usage-stats", env=env)
        assert node.returncode == 0, node.stderr[-2000:]
        deadline = time.time() + 120
        while True:  # the job API answers "No available agent" until the head's dashboard agent is up
            ready = _run("ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}", "--", "true",
                         env=env)
            if ready.returncode == 0:
                break
            assert time.time() < deadline, ready.stderr[-2000:]
            time.sleep(2)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard_port}", "env": env,
               "node2_temp_dir": node2_temp_dir}
    finally:
        for temp_dir in (node2_temp_dir, head_temp_dir):
            for pid in _node_processes(temp_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _submit(cluster, *entrypoint):
    return _run("ray", "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".",
                "--runtime-env", "jobs/runtime_env.yaml", "--", "python", *entrypoint,
                cwd=REPO, env=cluster["env"], timeout=900)


@pytest.fixture(scope="module")
def pipeline_job(cluster, tmp_path_factory):
    """The tiny pipeline (shortened) submitted with `ray job submit`; (run dir, job output)."""
    run_dir = tmp_path_factory.mktemp("job") / "run"
    job = _submit(cluster, "jobs/pipeline.py", "--config", "tiny", f"run.dir={run_dir}", *JOB_FAST)
    return run_dir, job


def test_job_submit_runs_the_pipeline(pipeline_job):
    run_dir, job = pipeline_job
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-4000:]
    assert "succeeded" in output
    assert "step      5/10 | loss" in output  # progress reaches the job log as it happens
    for path in ["export/model.safetensors", "best/model.safetensors", "best.json", "sweep/leaderboard.csv",
                 "report.md", "metrics.jsonl", "config.yaml"]:
        assert (run_dir / path).exists(), path


PREPARE_TASK_NODES = """
import json, sys
from ray.util.state import list_tasks
tasks = list_tasks(address=sys.argv[1], limit=10_000, raise_on_missing_output=False)
stages = ("_read_and_clean", "_dedup_and_shuffle", "_pack_file")
print(json.dumps({stage: sorted({t.node_id for t in tasks if stage in t.name}) for stage in stages}))
"""


def test_the_jobs_prepare_ran_its_ray_data_tasks_on_both_nodes(cluster, pipeline_job):
    assert pipeline_job[1].returncode == 0
    # Ray's state API, asked as a user would: which nodes ran prepare's Ray Data tasks (read + clean, dedup shuffle,
    # tokenize + pack). Each stage of this small corpus has only a few tasks, which Ray may place on one node; the
    # stages together use both.
    found = _run(sys.executable, "-c", PREPARE_TASK_NODES, cluster["dashboard"], env=cluster["env"])
    assert found.returncode == 0, found.stderr[-2000:]
    stages = json.loads(found.stdout.strip().splitlines()[-1])
    assert all(stages.values()), stages  # every stage ran as Ray tasks
    assert len({node for nodes in stages.values() for node in nodes}) == 2, stages


def test_failed_job_exits_non_zero_with_the_error_in_its_log(cluster, tmp_path):
    job = _submit(cluster, "jobs/pretrain.py", "--config", "tiny", f"run.dir={tmp_path}", "pretrain.max_stepz=5")
    assert job.returncode != 0
    assert "Did you mean 'pretrain.max_steps'" in job.stdout + job.stderr


def test_workers_spread_over_two_nodes_write_one_checkpoint(cluster, pipeline_job, tmp_path):
    """Restoring a checkpoint written from two nodes: test_killing_the_second_node_... (last in the module)."""
    prepared = pipeline_job[0] / "data"  # the job's prepared data: no need to prepare again
    # `ptray pretrain --address`, as a user connects to a running cluster
    proc = _run(sys.executable, "-m", "ptray.cli", "pretrain", "--config", "tiny", "--address", cluster["address"],
                f"run.dir={tmp_path}", "cluster.placement_strategy=STRICT_SPREAD", f"data.prepared_dir={prepared}",
                "pretrain.max_steps=4", "pretrain.ckpt_every=4", "pretrain.log_every=4", "pretrain.eval_every=8",
                "pretrain.eval_batches=2", env=cluster["env"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    [checkpoint] = [p for p in glob.glob(str(tmp_path / "train" / "checkpoint_*")) if os.path.isdir(p)]
    # Each rank wrote its own ZeRO shard and RNG file into the one shared checkpoint, from its own node.
    shards = glob.glob(os.path.join(checkpoint, "ds", "**", "*optim_states.pt"), recursive=True)
    assert len(shards) == 2, shards
    nodes = {torch.load(os.path.join(checkpoint, f"rng_rank{r}.pt"))["node_id"] for r in (0, 1)}
    assert len(nodes) == 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "export")


def test_unreachable_address_fails_fast_naming_it(tmp_path):
    closed = free_port()
    proc = _run(sys.executable, "-m", "ptray.cli", "pretrain", "--config", "tiny", "--address", f"127.0.0.1:{closed}",
                f"run.dir={tmp_path}", timeout=60)
    assert proc.returncode == 2
    assert f"cannot reach the Ray cluster at '127.0.0.1:{closed}'" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run(sys.executable, "-m", "ptray.cli", "pretrain", "--config", "tiny", "--address", "http://127.0.0.1:8265",
                f"run.dir={tmp_path}", timeout=60)
    assert proc.returncode == 2 and "is a dashboard / job-submission URL" in proc.stderr


def test_a_cluster_without_its_dashboard_fails_fast_naming_it(tmp_path, tmp_path_factory):
    """Without the dashboard's State API, Ray Train never gives back the resources of a stopped sweep trial, and the
    next trials wait forever: ptray says so before any work. (The module's cluster has a dashboard and passes.)"""
    port, temp_dir = free_port(), str(tmp_path_factory.mktemp("nodash"))  # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    try:
        assert _run("ray", "get-auth-token", "--generate", env=env).returncode == 0
        head = _run("ray", "start", "--head", "--include-dashboard=false", "--temp-dir", temp_dir, "--node-ip-address",
                    "127.0.0.1", "--port", str(port), "--num-cpus", "2", "--disable-usage-stats", env=env)
        assert head.returncode == 0, head.stderr[-2000:]
        proc = _run(sys.executable, "-m", "ptray.cli", "pretrain", "--config", "tiny", "--address",
                    f"127.0.0.1:{port}", f"run.dir={tmp_path}/run", env=env, timeout=120)
    finally:
        for pid in _node_processes(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not answer Ray's State API" in proc.stderr and "--include-dashboard=false" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "data").exists()  # failed before any work


def test_gpus_on_a_cpu_cluster_fail_fast_with_the_shortfall(cluster, tmp_path):
    proc = _run(sys.executable, "-m", "ptray.cli", "pretrain", "--config", "tiny", "--address", cluster["address"],
                "cluster.use_gpu=true", f"run.dir={tmp_path}", env=cluster["env"], timeout=120)
    assert proc.returncode == 2
    assert "cannot place 2 workers of 1 CPU + 1 GPU each" in proc.stderr and "0 GPU" in proc.stderr
    assert not (tmp_path / "data").exists()  # failed before any work


def test_killing_the_second_node_mid_run_restarts_on_the_head_from_the_checkpoint(cluster, pipeline_job, tmp_path):
    """Last in the module: the second node is gone afterwards."""
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "ptray.cli", "pretrain", "--config", "tiny", "--address", cluster["address"],
         f"run.dir={tmp_path}", f"data.prepared_dir={pipeline_job[0] / 'data'}", "cluster.placement_strategy=SPREAD",
         "cluster.max_failures=2", "pretrain.max_steps=12", "pretrain.ckpt_every=4", "pretrain.log_every=1",
         "pretrain.eval_every=100", "pretrain.eval_batches=2"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=cluster["env"])
    try:
        deadline = time.time() + 300
        while not any(r.get("step", 0) >= 6 for r in read_metrics(str(tmp_path))):  # past the step-4 checkpoint
            assert driver.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        [checkpoint] = [p for p in glob.glob(str(tmp_path / "train" / "checkpoint_*")) if os.path.isdir(p)]
        nodes = {torch.load(os.path.join(checkpoint, f"rng_rank{r}.pt"))["node_id"] for r in (0, 1)}
        assert len(nodes) == 2  # SPREAD put one worker on each node
        victims = _node_processes(cluster["node2_temp_dir"])
        assert any("raylet" in open(f"/proc/{pid}/cmdline").read() for pid in victims), victims
        for pid in victims:  # the whole node at once, as a machine that loses power
            os.kill(pid, signal.SIGKILL)
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = log.read_text()
    assert driver.returncode == 0, output[-4000:]
    # From the step-4 checkpoint (or a later one), which the two nodes' ranks wrote together.
    resumed_at = int(re.search(r"resumed from \S+ at step (\d+)", output).group(1))
    assert resumed_at >= 4
    assert [r["step"] for r in read_metrics(str(tmp_path)) if "loss" in r] == list(range(1, 13))
    last = sorted(p for p in glob.glob(str(tmp_path / "train" / "checkpoint_*")) if os.path.isdir(p))[-1]
    assert len({torch.load(os.path.join(last, f"rng_rank{r}.pt"))["node_id"] for r in (0, 1)}) == 1  # all on the head
    AutoModelForCausalLM.from_pretrained(tmp_path / "export")
