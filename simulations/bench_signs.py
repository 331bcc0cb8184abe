"""How often a layer's singular pairs change sign between rounds: the fixed sign rule of
:func:`mergenet_fl.factorize` against alignment with the previous packet.

    python -m simulations.bench_signs                 # ResNet-8 of federation=paper, 120 rounds

Trains one client of ``federation=paper`` in 4-batch rounds, factorises its transfer layers
after every round, and prints one JSON line per layer: the singular pairs compared (rounds 21
onwards, past the first fast changes) and how many pointed against the previous round's.
"""

from __future__ import annotations

import argparse
import json

import torch

from mergenet_fl import align_signs, factorize
from mergenet_fl.selection import get_matrix
from simulations.config import compose
from simulations.federation import build_workload


def flips(partition_id: int, rounds: int, rank: int, skip: int = 20) -> list[dict]:
    work = build_workload(compose(["federation=paper"]), partition_id)
    work.reset_model()
    last: dict[str, torch.Tensor] = {}
    last_aligned: dict[str, torch.Tensor] = {}
    counts = {layer.name: {"pairs": 0, "fixed_rule": 0, "aligned": 0} for layer in work.layers}
    for rnd in range(rounds):
        work.task.train(
            work.model,
            work.train_set,
            steps=4,
            batch_size=32,
            seed=rnd,
            data_seed=3,
            state=work.train_state,
        )
        for layer in work.layers:
            a, b = factorize(get_matrix(work.model, layer), rank)
            aligned = a if rnd == 0 else align_signs(a, b, last_aligned[layer.name])[0]
            if rnd > skip:
                c = counts[layer.name]
                c["pairs"] += a.shape[1]
                c["fixed_rule"] += int(((a * last[layer.name]).sum(0) < 0).sum())
                c["aligned"] += int(((aligned * last_aligned[layer.name]).sum(0) < 0).sum())
            last[layer.name], last_aligned[layer.name] = a, aligned
    return [
        {"client": work.identity.group, "layer": name, "rounds": rounds - skip - 1, **c}
        for name, c in counts.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition-id", type=int, default=1, help="1: the ResNet-8")
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for row in flips(args.partition_id, args.rounds, args.rank):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
