"""Kill ``memtx train`` with SIGKILL at random moments, resume it each time, and check that the
result is the run that was never killed.

For each trial the script starts ``python -m memtx train`` (``--resume`` once the run directory
exists), kills it after a random delay, and checks that the run directory still holds a
loadable checkpoint (``memtx.load`` + the trainer state). After ``--kills`` kills it lets the
run finish, then checks:

* the final weights and memory state equal, bit for bit, those of a reference run trained
  straight through (so no segment was lost or fed twice, and the optimizer, schedule, RNG and
  memory came back exactly);
* ``metrics.jsonl`` has each step once, with the same loss and data cursor as the reference.

Usage::

    python benchmarks/kill_resume.py --kills 12 [--data task:recall] [--seed 0]

Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import memtx  # noqa: E402
from memtx.training import latest_checkpoint, read_metrics  # noqa: E402
from memtx.training.checkpoint import read_rank_part, read_trainer_state  # noqa: E402


STEPS = 150


def train_command(out: Path, data: str, resume: bool) -> list[str]:
    # checkpoints every 3 steps: kills land inside checkpoint writes often
    command = [sys.executable, "-m", "memtx", "train", "--out", str(out), "--data", data,
               "--preset", "tiny", "--steps", str(STEPS), "--batch-size", "4", "--log-every", "1",
               "--checkpoint-every", "3", "--keep-checkpoints", "2", "--eval-batch-size", "4",
               "--eval-segments", "8", "--dropout", "0.1", "--progress", "false"]
    return command + (["--resume"] if resume else [])


def last_step(run_dir: Path) -> int:
    """The last step in ``metrics.jsonl`` (0 before the first)."""
    steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]
    return steps[-1] if steps else 0


def check_loadable(run_dir: Path) -> str:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return "no checkpoint yet"
    memtx.load(checkpoint)
    state = read_trainer_state(checkpoint)
    read_rank_part(checkpoint, 0)
    return f"{checkpoint.name} loadable (step {state['step']})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--data", default="task:recall")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    work = Path(tempfile.mkdtemp(prefix="memtx-kill-resume-"))
    reference, victim = work / "reference", work / "victim"

    started = time.time()
    subprocess.run([sys.executable, "-c", "import memtx.training"], env=env, check=True)
    startup_s = time.time() - started
    started = time.time()
    subprocess.run(train_command(reference, args.data, False), env=env, check=True,
                   capture_output=True)
    straight_s = time.time() - started
    print(f"reference run: {straight_s:.1f}s (of which {startup_s:.1f}s importing)", flush=True)

    failures = []
    for trial in range(1, args.kills + 1):
        process = subprocess.Popen(train_command(victim, args.data, victim.exists()), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Start-up time varies a lot on a busy machine, so kills are placed by progress: once
        # the run has logged a randomly chosen step (a share of the steps left), it
        # is killed after a further random fraction of a step, which lands anywhere in a
        # training step, a metrics write or a checkpoint write. Targets leave steps for the
        # kills still to come, so every kill interrupts an unfinished run.
        done, kills_left = last_step(victim), args.kills - trial + 1
        target = done + rng.randint(1, max(1, 2 * (STEPS - done) // (kills_left + 1)))
        started = time.time()
        while process.poll() is None and last_step(victim) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.08))
        delay = time.time() - started
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        finished = process.returncode == 0
        stderr = process.stderr.read().decode() if process.stderr else ""
        if process.returncode not in (0, -signal.SIGKILL):
            failures.append(f"trial {trial}: exit {process.returncode}: {stderr[-500:]}")
        try:
            status = check_loadable(victim)
        except Exception as err:  # noqa: BLE001 - any failure to load is what we look for
            status = f"NOT LOADABLE: {err}"
            failures.append(f"trial {trial}: {status}")
        print(f"trial {trial:2d}: killed {delay:5.2f}s after launch, at step >= {target} -> {status}"
              + (" (run had finished)" if finished else ""), flush=True)
        if finished:
            break

    final = subprocess.run(train_command(victim, args.data, True), env=env, capture_output=True,
                           text=True)
    if final.returncode != 0:
        failures.append(f"final resume failed: {final.stderr[-500:]}")
    ref_ckpt, victim_ckpt = latest_checkpoint(reference), latest_checkpoint(victim)
    a, b = load_file(str(ref_ckpt / "model.safetensors")), load_file(str(victim_ckpt / "model.safetensors"))
    same_weights = ref_ckpt.name == victim_ckpt.name and all(torch.equal(a[k], b[k]) for k in a)
    mem_a, mem_b = read_rank_part(ref_ckpt, 0)["memory"], read_rank_part(victim_ckpt, 0)["memory"]
    same_memory = all(torch.equal(mem_a[k], mem_b[k]) for k in mem_a)
    trail = lambda d: [(r["step"], r["loss"], r["data"]) for r in read_metrics(d)  # noqa: E731
                       if r["kind"] == "train"]
    same_trail = trail(reference) == trail(victim)
    steps = [s for s, _, _ in trail(victim)]
    print(f"final checkpoint {victim_ckpt.name}: weights identical to the straight run: "
          f"{same_weights}; memory identical: {same_memory}; every step logged once with the "
          f"same loss and data cursor: {same_trail} ({len(steps)} steps, {len(set(steps))} distinct)")
    if not (same_weights and same_memory and same_trail):
        failures.append("the resumed run differs from the straight run")
    for failure in failures:
        print("FAIL:", failure)
    print("PASS" if not failures else "FAILED", f"({work})")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
