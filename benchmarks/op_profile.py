"""Op-by-op CPU profile of this project's train step next to Hugging Face's, same workload.

    python -m benchmarks.op_profile                      # ViT-Ti/16 MAE, 224 px, batch 16, 1 thread, eager fp32
    python -m benchmarks.op_profile --steps 8 --rows 40 --precision bf16

Each contender runs ``steps`` profiled training steps in alternating order (A B, B A, ...);
the table gives the mean self CPU time per step of every operator and its calls per step,
so a gap in ``mae-bench``'s ``hf`` section can be traced to the operators that make it.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.hf_compare import hf_contender
from benchmarks.model_step import Settings
from benchmarks.project import Workload, project_contender

OpTable = dict[str, tuple[float, float]]  # operator -> (self CPU ms per step, calls per step)


def profile_steps(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, OpTable]:
    """Mean self CPU time (ms) and calls per step of each operator, for every named step function."""
    for step in steps.values():
        step()  # warm caches and the allocator outside the profile
    ms: dict[str, Counter[str]] = {name: Counter() for name in steps}
    calls: dict[str, Counter[str]] = {name: Counter() for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[name]()
            for event in prof.key_averages():
                ms[name][event.key] += event.self_cpu_time_total / 1e3 / rounds
                calls[name][event.key] += event.count / rounds
    return {name: {op: (ms[name][op], calls[name][op]) for op in ms[name]} for name in names}


def render(tables: dict[str, OpTable], rows: int) -> str:
    """The ``rows`` most expensive operators, one column pair per contender, then the totals."""
    names = list(tables)
    ops = sorted(
        {op for t in tables.values() for op in t}, key=lambda op: -max(t.get(op, (0, 0))[0] for t in tables.values())
    )
    head = f"{'operator (self CPU ms / calls per step)':58s}" + "".join(f"{n:>22s}" for n in names)
    lines = [head, "-" * len(head)]
    for op in ops[:rows]:
        cells = "".join(
            f"{tables[n].get(op, (0.0, 0.0))[0]:14.2f} /{tables[n].get(op, (0.0, 0.0))[1]:6.0f}" for n in names
        )
        lines.append(f"{op[:58]:58s}{cells}")
    lines.append(f"{'total':58s}" + "".join(f"{sum(v[0] for v in tables[n].values()):14.2f}        " for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.op_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mae_vit_tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=6, help="profiled steps per contender (alternating)")
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work, settings, cpu = (
        Workload(args.preset, args.batch_size, args.img_size),
        Settings(precision=args.precision),
        torch.device("cpu"),
    )
    steps = {"project": project_contender(work, settings, cpu).step, "hf": hf_contender(work, settings, cpu).step}
    print(render(profile_steps(steps, args.steps), args.rows))


if __name__ == "__main__":
    main()
