"""Forward + backward speed (and T=4096 peak memory) of the GateLoop forms, side by side.

Contenders, all on the same inputs (leaf q, k, v and a leaf complex gate a, so only the op is
timed, not the gate's construction):

* chunked  - memtx.ops.scan.gate_loop_chunked (default strategy and chunk size)
* scan-ref - memtx.ops.scan_ref.gate_loop_associative_scan_ref
* seed     - gateloop_transformer.gateloop_transformer.gate_loop_operator (if importable),
             fed the same tensors reshaped to its (B*H, T, D) / (B*H, T, 1, 1) layout

Timing alternates the contenders within each round (A B C A B C ...) so that load drifts on a
shared machine hit all of them alike, and reports median time and the median over rounds of the
per-round ratio to chunked. Peak memory is the growth of the process's max RSS during one
forward + backward, each measured in a fresh subprocess.

Shapes: q, k (B, H, T, Dk); v (B, H, T, Dv); a (B, H, T) complex; Dk = Dv = D; dim = H * D.

    python benchmarks/scan_speed.py [--rounds 5] [--threads 2] [--no-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Tuple

# On a shared, oversubscribed CPU, spinning OpenMP workers steal the cores from the main thread
# and every parallel op then waits a scheduler time slice (measured: 20x slower chunked form at
# load ~9 on 2 cores). Sleeping workers make the timings about the kernels. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import Tensor

from memtx.bench.memory import peak_above_now  # noqa: E402
from memtx.ops.scan import default_chunk_size, gate_loop_chunked  # noqa: E402
from memtx.ops.scan_ref import gate_loop_associative_scan_ref  # noqa: E402

try:
    from gateloop_transformer.gateloop_transformer import gate_loop_operator
except ImportError:  # the seed package is optional
    gate_loop_operator = None

Inputs = Tuple[Tensor, Tensor, Tensor, Tensor]

CONFIGS = {  # name: (B, H, D)
    "8 heads x D32": (4, 8, 32),
    "256 heads x D1": (4, 256, 1),
}


def make_inputs(B: int, H: int, T: int, D: int, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
    z = torch.randn(B, H, T, 2, generator=g)
    # The model's gate: |a| = sigmoid(|z|) in [0.5, 1), phase = angle(z).
    zc = torch.complex(z[..., 0], z[..., 1])
    a = torch.polar(torch.sigmoid(zc.abs()), zc.angle()).detach().requires_grad_()
    return q, k, v, a


def _chunked(q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> Tensor:
    return gate_loop_chunked(q, k, v, a)[0]


def _scan_ref(q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> Tensor:
    return gate_loop_associative_scan_ref(q, k, v, a)[0]


def _seed(q: Tensor, k: Tensor, v: Tensor, a: Tensor) -> Tensor:
    assert gate_loop_operator is not None
    B, H, T, D = q.shape
    out = gate_loop_operator(
        q.reshape(B * H, T, D), k.reshape(B * H, T, D), v.reshape(B * H, T, -1),
        a.reshape(B * H, T, 1, 1),
    )
    return out.reshape(B, H, T, -1)


def contenders() -> Dict[str, Callable[..., Tensor]]:
    fns: Dict[str, Callable[..., Tensor]] = {"chunked": _chunked, "scan-ref": _scan_ref}
    if gate_loop_operator is not None:
        fns["seed"] = _seed
    return fns


def fwd_bwd(fn: Callable[..., Tensor], inputs: Inputs) -> None:
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(torch.ones_like(out))


def time_config(B: int, H: int, D: int, T: int, rounds: int) -> List[dict]:
    inputs = make_inputs(B, H, T, D)
    fns = contenders()
    for fn in fns.values():  # warm-up, and a parity check so we compare like with like
        fwd_bwd(fn, inputs)
    with torch.no_grad():
        ref = _chunked(*inputs)
        for name, fn in fns.items():
            err = (fn(*inputs) - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()
            assert err < 1e-4, f"{name} disagrees with chunked: rel-RMS {float(err):.2e}"
    times: Dict[str, List[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fwd_bwd(fn, inputs)
            times[name].append(time.perf_counter() - t0)
    base = times["chunked"]
    return [
        {
            "contender": name,
            "median_ms": 1000 * statistics.median(ts),
            "ratio": statistics.median(t / b for t, b in zip(ts, base)),
        }
        for name, ts in times.items()
    ]


def _memory_child(contender: str, B: int, H: int, D: int, T: int) -> None:
    """Runs in a fresh process: one forward + backward, prints peak RSS growth in MiB.

    See memtx.bench.memory: the peak above the resident memory just before the call.
    """
    inputs = make_inputs(B, H, T, D)
    fn = contenders()[contender]
    fwd_bwd(fn, make_inputs(1, 1, 64, D))  # load kernels/allocator pools outside the window
    with peak_above_now() as peak:
        fwd_bwd(fn, inputs)
    print(json.dumps({"peak_mib": peak["mib"]}))


def measure_memory(contender: str, B: int, H: int, D: int, T: int, threads: int) -> str:
    cmd = [sys.executable, __file__, "--memory-child", contender, f"{B},{H},{D},{T}",
           "--threads", str(threads)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "timeout"
    if res.returncode != 0:
        return f"failed (rc {res.returncode})"
    return f"{json.loads(res.stdout.strip().splitlines()[-1])['peak_mib']:.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--T", type=int, default=1024, help="sequence length for timing")
    p.add_argument("--mem-T", type=int, default=4096, help="sequence length for peak memory")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-child", nargs=2, metavar=("CONTENDER", "B,H,D,T"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.memory_child:
        B, H, D, T = (int(x) for x in args.memory_child[1].split(","))
        _memory_child(args.memory_child[0], B, H, D, T)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), fp32, CPU, "
          f"load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"fwd+bwd, median of {args.rounds} alternating rounds; "
          f"seed package {'found' if gate_loop_operator else 'NOT importable'}")
    print(f"ratio = median over rounds of (time / chunked time); peak = max-RSS growth at "
          f"T={args.mem_T}, fresh process")
    header = f"{'config':<16} {'C':>3} {'contender':<10} {'T=' + str(args.T) + ' ms':>11} " \
             f"{'ratio':>7} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for cname, (B, H, D) in CONFIGS.items():
        rows = time_config(B, H, D, args.T, args.rounds)
        for row in rows:
            mem = "-" if args.no_memory else measure_memory(
                row["contender"], B, H, D, args.mem_T, args.threads
            )
            chunk = str(default_chunk_size(D)) if row["contender"] == "chunked" else ""
            print(f"{cname:<16} {chunk:>3} {row['contender']:<10} "
                  f"{row['median_ms']:>11.1f} {row['ratio']:>7.2f} {mem:>9}", flush=True)


if __name__ == "__main__":
    main()
