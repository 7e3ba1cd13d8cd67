"""Critic training throughput vs bare MLP forward/backward of the same sizes, measured in the same run.

    python benchmarks/critic_bench.py OUT.json [--updates 300] [--repeats 5] [--threads 1] [--d 384]

Rows (updates/s over ``--repeats`` runs, the rows interleaved so that load from other processes on a
shared machine hits them alike; ratios use the best run of each row, as ``timeit`` does — on a busy
machine the best run is the least disturbed one — and the medians are reported beside them):

- ``bare_mlp``   the four heads (Q1, Q2 over f(s,a); V1, V2 over f(s)) as plain ``nn.Sequential``:
                 forward, MSE, backward, one Adam step, on one fixed resident batch;
- ``bare_td``    ``bare_mlp`` plus what a TD update must compute besides: the four target heads'
                 forwards (V̄(s'), Q̄(s, a)) and the Polyak step — still one fixed batch, no sampler;
- ``critic_td``  ``digiq.critic.train_critic`` (target td): sampling from a resident table, two Adam
                 optimizers with grad clipping, logging, everything;
- ``critic_mc``  the same with target mc (no target-network work).

Ratios: ``critic_td / bare_td`` isolates data loading + bookkeeping (target ≥ 0.8);
``critic_td / bare_mlp`` also pays the TD target forwards (≈ +1/3 of the FLOPs, so ≤ ~0.75 by design);
``critic_mc / bare_mlp`` is the like-for-like comparison without target networks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from digiq.config import CriticParams
from digiq.critic import train_critic
from digiq.transitions import Transitions


def bare_heads(d: int, hidden: tuple[int, ...]) -> nn.ModuleList:
    def one() -> nn.Sequential:
        dims = [d, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(dims[-1], 1))

    return nn.ModuleList([one() for _ in range(4)])  # Q1, Q2, V1, V2


def bare_runner(d: int, hidden: tuple[int, ...], batch: int, with_td: bool) -> Callable[[int], None]:
    heads = bare_heads(d, hidden)
    targets = bare_heads(d, hidden).requires_grad_(False)
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-3, fused=True)  # the critic uses fused Adam too
    s, sa, s_next = (torch.randn(batch, d) for _ in range(3))
    y = torch.randn(batch)
    loss_fn = nn.MSELoss()

    def run(updates: int) -> None:
        for _ in range(updates):
            if with_td:
                with torch.no_grad():
                    y_q = y + 0.95 * torch.minimum(targets[2](s_next), targets[3](s_next)).squeeze(-1)
                    y_v = torch.minimum(targets[0](sa), targets[1](sa)).squeeze(-1)
            else:
                y_q = y_v = y
            loss = sum(loss_fn(h(x).squeeze(-1), t) for h, x, t in zip(heads, (sa, sa, s, s), (y_q, y_q, y_v, y_v)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if with_td:
                with torch.no_grad():
                    torch._foreach_lerp_(list(targets.parameters()), list(heads.parameters()), 0.1)

    return run


def critic_runner(data: Transitions, hidden: tuple[int, ...], batch: int, target: str) -> Callable[[int], None]:
    def run(updates: int) -> None:
        params = CriticParams(target=target, hidden=list(hidden), batch_size=batch, updates=updates, device="cpu")
        train_critic(data, params, gamma=0.95, seed=0)

    return run


def random_transitions(n: int, d: int, seed: int = 0) -> Transitions:
    g = torch.Generator().manual_seed(seed)
    return Transitions(s=torch.randn(n, d, generator=g), sa=torch.randn(n, d, generator=g), s_next=torch.randn(n, d, generator=g),
                       reward=(torch.rand(n, generator=g) < 0.1).float(), done=(torch.rand(n, generator=g) < 0.2).float(),
                       mc_return=torch.rand(n, generator=g))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--updates", type=int, default=300, help="updates per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--d", type=int, default=384, help="feature size d_s = d_sa")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--transitions", type=int, default=20000, help="rows in the in-memory table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    hidden = tuple(CriticParams().hidden)
    data = random_transitions(args.transitions, args.d)
    runners = {
        "bare_mlp": bare_runner(args.d, hidden, args.batch, with_td=False),
        "bare_td": bare_runner(args.d, hidden, args.batch, with_td=True),
        "critic_td": critic_runner(data, hidden, args.batch, "td"),
        "critic_mc": critic_runner(data, hidden, args.batch, "mc"),
    }
    for run in runners.values():  # warm-up (allocator, kernel selection)
        run(20)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run(args.updates)
            rates[name].append(args.updates / (time.perf_counter() - start))
    best = {name: max(r) for name, r in rates.items()}
    median = {name: statistics.median(r) for name, r in rates.items()}

    def ratios(of: dict[str, float]) -> dict[str, float]:
        return {"critic_td/bare_td": of["critic_td"] / of["bare_td"], "critic_td/bare_mlp": of["critic_td"] / of["bare_mlp"],
                "critic_mc/bare_mlp": of["critic_mc"] / of["bare_mlp"]}

    result = {
        "d": args.d, "batch": args.batch, "hidden": list(hidden), "threads": args.threads, "updates": args.updates,
        "repeats": args.repeats, "transitions": args.transitions, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "load_average": list(os.getloadavg()),
        "updates_per_s_best": best, "updates_per_s_median": median, "updates_per_s_all": rates,
        "ratios_best": ratios(best), "ratios_median": ratios(median), "target_ratio": 0.8,
        "pass": ratios(best)["critic_td/bare_td"] >= 0.8,
    }
    print(f"{'row':<12}{'best':>10}{'median':>10}{'min':>10}   updates/s")
    for name, r in rates.items():
        print(f"{name:<12}{best[name]:>10.1f}{median[name]:>10.1f}{min(r):>10.1f}")
    for (name, value), med in zip(result["ratios_best"].items(), result["ratios_median"].values()):
        print(f"{name:<20}{value:>8.3f} (medians {med:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
