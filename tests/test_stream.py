"""data.ingest=ray_data: the rows stream from the corpus through Ray Data into the workers, and every row is trained
exactly once per epoch, across a killed worker and the restart from its checkpoint. Real Ray, real DeepSpeed, the
real CLI in its own process."""

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict

from ptray.config import load_config
from ptray.data.manifest import read_manifest
from ptray.data.stream import data_settings, source_rows
from ptray.metrics import read_metrics
from test_resume import LIBRARY_CHATTER, _descendants

# 1,000 built-in documents pack into about 930 rows of 65 tokens, an epoch of ~29 steps of 32 rows. Ray Data runs
# a few (epoch, source) tasks at once, so the next epoch's rows start before the last source of this one is used up:
# 80 steps (~2.7 epochs) leave the first epoch complete. A small shuffle buffer keeps the epochs from blurring more.
ARGS = ["--config", "tiny", "data.ingest=ray_data", "data.builtin_docs=1000", "data.shuffle_window_rows=64",
        "pretrain.max_steps=80", "pretrain.ckpt_every=10", "pretrain.eval_every=30", "pretrain.log_every=5",
        "pretrain.warmup_steps=5", "sweep.pretrained_steps=[]", "cluster.max_failures=1"]


def _effective_history(trace_dir) -> list[tuple]:
    """Rows trained at each step as the final weights saw them: where a restarted attempt redid a rank's step, its
    records replace the killed attempt's."""
    by_step = defaultdict(dict)  # (step, rank) -> process start -> rows
    for name in os.listdir(trace_dir):
        for line in open(os.path.join(trace_dir, name)):
            record = json.loads(line)
            by_step[record["step"], record["rank"]].setdefault(record["started"], []).extend(map(tuple, record["rows"]))
    return [row for attempts in by_step.values() for row in attempts[max(attempts)]]


def test_a_killed_worker_resumes_the_stream_and_every_row_is_trained_exactly_once(tmp_path):
    run_dir, trace_dir = tmp_path / "run", tmp_path / "trace"
    trace_dir.mkdir()
    log = tmp_path / "driver.log"
    env = {**os.environ, "PTRAY_TRACE_ROWS": str(trace_dir)}
    driver = subprocess.Popen([sys.executable, "-m", "ptray.cli", "pretrain", *ARGS, f"run.dir={run_dir}"],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.time() + 400
        while not any(r.get("step", 0) >= 14 for r in read_metrics(str(run_dir)) if "loss" in r):
            assert driver.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        workers = [pid for pid, args in _descendants(driver.pid) if args.startswith("ray::RayTrainWorker")]
        assert len(workers) == 2, _descendants(driver.pid)
        os.kill(workers[1], signal.SIGKILL)  # after the step-10 checkpoint: steps 11.. are trained twice
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    output = log.read_text()
    assert driver.returncode == 0, output[-3000:]
    assert "resumed from" in output and "at step 10" in output, output[-3000:]

    history = _effective_history(trace_dir)
    assert len(history) == 80 * 32  # every step's rows, from both ranks
    counts = Counter((epoch, source, index) for epoch, source, index, _ in history)
    assert max(counts.values()) == 1, [row for row, n in counts.items() if n > 1][:10]  # nothing trained twice
    # The first epoch, row by row: exactly the rows its sources pack into, with their tokens (by CRC), each once.
    cfg = load_config(str(run_dir / "config.yaml"))
    expected = set()
    manifest = read_manifest(str(run_dir / "stream"))
    for source, path in enumerate(manifest.source_files):
        rows = list(source_rows(path, data=data_settings(cfg), seed=cfg.run.seed, split="train",
                                tokenizer_dir=str(run_dir / "stream" / "tokenizer"), eos_id=manifest.eos_id,
                                chunk_seed=cfg.run.seed * 1_000_003))
        expected |= {(source, index, zlib.crc32(row.tobytes()))
                     for index, row in enumerate(r for chunk in rows for r in chunk)}
    first_epoch = {(source, index, crc) for epoch, source, index, crc in history if epoch == 0}
    assert first_epoch == expected, (len(first_epoch), len(expected), len(first_epoch - expected))
    assert {epoch for epoch, _, _, _ in history} >= {0, 1, 2}  # and the stream went on into later epochs
    assert not [line for line in output.splitlines() if any(s in line for s in LIBRARY_CHATTER)]
