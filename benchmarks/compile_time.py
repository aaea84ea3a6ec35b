"""Cold compile time of the compiled (or native) step, and recompiles over 100 steps with a changing lr.

    python benchmarks/compile_time.py --optims adamw adamw_8bit lion --execution compiled native

Each optimizer runs in a fresh subprocess with an empty inductor cache and an
empty hf_optim kernel cache, so the first step pays the whole cold compile
(compiled: dynamo trace + inductor + C++ build; native: building
``hf_optim/kernels/cpu_step.c``, once per machine).
Then 100 steps follow with the lr changed every step (as a schedule does) and
betas changed every 10; the number of graphs compiled after the first step
must stay 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch
from torch._dynamo.utils import counters
import hf_optim
torch.set_num_threads(int(sys.argv[3]))
name, tensors, execution = sys.argv[1], int(sys.argv[2]), sys.argv[4]
gen = torch.Generator().manual_seed(0)
params = [torch.randn(512, 256, generator=gen).requires_grad_() for _ in range(tensors)]
for p in params:
    p.grad = torch.randn(p.shape, generator=gen) * 1e-2
t0 = time.perf_counter()  # construction too: execution="native" builds its kernel there
opt = hf_optim.create_optimizer(name, params, lr=1e-4, execution=execution)
opt.step()
cold = time.perf_counter() - t0
graphs = counters["stats"]["unique_graphs"]
for step in range(100):
    for group in opt.param_groups:
        group["lr"] = 1e-4 * (1 - step / 100)
        if "betas" in group and step % 10 == 0:
            group["betas"] = (0.9 - step / 1000, group["betas"][1])
    opt.step()
print(json.dumps({"optim": name, "execution": execution, "tensors": tensors, "cold_compile_s": cold, "graphs": graphs,
                  "recompiles": counters["stats"]["unique_graphs"] - graphs}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optims", nargs="+", default=["adamw"])
    parser.add_argument("--tensors", nargs="+", type=int, default=[8, 13])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--execution", nargs="+", default=["compiled"], choices=["compiled", "native"])
    args = parser.parse_args(argv)
    print(f"{'optim':20s} {'execution':>9s} {'tensors':>7s} {'cold compile s':>15s} {'graphs':>7s} "
          f"{'recompiles/100 steps':>21s}")
    for name in args.optims:
        for execution in args.execution:
            for tensors in args.tensors:
                with tempfile.TemporaryDirectory() as cache:
                    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "HF_OPTIM_CACHE": cache}
                    out = subprocess.run(
                        [sys.executable, "-c", CHILD, name, str(tensors), str(args.threads), execution],
                        env=env, capture_output=True, text=True,
                    )
                if out.returncode != 0:  # e.g. execution="native" for a rule without a kernel
                    print(f"{name:20s} {execution:>9s} {tensors:7d}  failed: {out.stderr.strip().splitlines()[-1]}")
                    continue
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{name:20s} {execution:>9s} {tensors:7d} {row['cold_compile_s']:15.1f} {row['graphs']:7d} "
                      f"{row['recompiles']:21d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
