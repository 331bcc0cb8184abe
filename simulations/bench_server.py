"""Benchmark one server transfer round: merged factors for every client plus one adapter update.

Prints one JSON object per line. Each size runs in a fresh process so ``peak_mb`` is its own.

    python -m simulations.bench_server                     # 10, 100, 1000 clients on CPU
    python -m simulations.bench_server --clients 100 --device cuda
    python -m simulations.bench_server --group-targets     # one target per architecture group
    python -m simulations.bench_server --update-rows none  # the adapter's step from every target
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from mergenet_fl import (
    AdapterConfig,
    HypernetConfig,
    Hypernetwork,
    KnowledgeBank,
    KnowledgePacket,
    LayerFactors,
    factorize,
)

# Realistic transfer layers: a ResNet classifier, a MobileNetV2 classifier, a MobileNetV2 1x1
# conv and a BERT-base attention Value matrix.
GROUPS = {
    "resnet_fc": ((10, 512), "linear"),
    "mbv2_classifier": ((100, 1280), "linear"),
    "mbv2_conv1x1": ((160, 960, 1, 1), "conv2d"),
    "bert_value": ((768, 768), "linear"),
}


def make_bank(clients: int, rank: int, device: torch.device, seed: int) -> KnowledgeBank:
    """``clients`` peers spread over the groups, each with a random weight's factors."""
    gen = torch.Generator().manual_seed(seed)
    bank = KnowledgeBank()
    names = list(GROUPS)
    for i in range(clients):
        group = names[i % len(names)]
        shape, kind = GROUPS[group]
        w = torch.randn(shape[0], int(torch.tensor(shape[1:]).prod()), generator=gen)
        a, b = factorize(w / w.shape[1] ** 0.5, rank)
        packet = KnowledgePacket({"layer": LayerFactors(a.to(device), b.to(device), shape, kind)})
        bank.put(f"client{i:05d}", packet, group=group, round=1)
    return bank


def random_pieces(merged: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        cid: {
            layer: (
                torch.randn(a.shape, generator=gen).to(a.device) * 1e-3,
                torch.randn(b.shape, generator=gen).to(b.device) * 1e-3,
            )
            for layer, (a, b) in layers.items()
        }
        for cid, layers in merged.items()
    }


def run_one(
    clients: int,
    rank: int,
    device_name: str,
    seed: int,
    max_tokens: int | None,
    group_targets: bool,
    update_rows: int | None,
) -> dict:
    device = torch.device(device_name)
    torch.manual_seed(seed)
    bank = make_bank(clients, rank, device, seed)
    adapter = AdapterConfig(rank=rank, seed=seed, max_source_tokens=max_tokens)
    hn = Hypernetwork(
        HypernetConfig(adapter=adapter, group_targets=group_targets, update_rows=update_rows)
    )
    hn.adapter.to(device)
    targets = list(bank)
    # Warm-up round: registers the layer shapes and moves the adapter away from identity.
    merged, generation = hn.generate(bank, targets, round=1)
    hn.update(generation, random_pieces(merged, seed))
    merged, generation = hn.generate(bank, targets, round=2)
    pieces = random_pieces(merged, seed + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    hn.update(generation, pieces)
    merged, _ = hn.generate(bank, targets, round=3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    # Per client and transfer round: packet and gradient pieces up, merged factors down.
    sent: dict[str, list[int]] = {}  # group -> [values exchanged, values of full matrices]
    for cid in targets:
        packet = bank.get(cid).packet
        ((pa, pb),) = merged[cid].values()
        exchanged = packet.num_values() + 2 * (pa.numel() + pb.numel())
        full = 2 * sum(m * n for m, n in packet.matrix_shapes().values())  # FedAvg: both ways
        counts = sent.setdefault(bank.get(cid).group, [0, 0])
        counts[0] += exchanged
        counts[1] += full
    up_down = sum(c[0] for c in sent.values())
    full = sum(c[1] for c in sent.values())
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "clients": clients,
        "groups": len(bank.groups()),
        "rank": rank,
        "device": device_name,
        "threads": torch.get_num_threads(),
        "seconds": round(seconds, 3),
        "peak_mb": round(peak_mb, 1),
        "max_source_tokens": max_tokens,
        "group_targets": group_targets,
        "update_rows": update_rows,
        "bytes_per_client": round(4 * up_down / clients),
        "bytes_full": round(4 * full / clients),
        "ratio": round(up_down / full, 4),
        "ratio_by_group": {g: round(c[0] / c[1], 4) for g, c in sorted(sent.items())},
        "adapter_params": sum(p.numel() for p in hn.adapter.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-source-tokens",
        default=str(AdapterConfig.max_source_tokens),
        help="tokens per source layer in the long readings; 'none' attends to all",
    )
    parser.add_argument(
        "--group-targets", action="store_true", help="one target per group (share is on)"
    )
    parser.add_argument(
        "--update-rows",
        default=str(HypernetConfig.update_rows),
        help="most targets one adapter step backpropagates (a scaled sample); 'none': all",
    )
    args = parser.parse_args()
    max_tokens = None if args.max_source_tokens.lower() == "none" else int(args.max_source_tokens)
    update_rows = None if args.update_rows.lower() == "none" else int(args.update_rows)
    if len(args.clients) == 1:
        result = run_one(
            args.clients[0],
            args.rank,
            args.device,
            args.seed,
            max_tokens,
            args.group_targets,
            update_rows,
        )
        print(json.dumps(result), flush=True)
        return
    for n in args.clients:
        cmd = [sys.executable, "-m", "simulations.bench_server", "--clients", str(n)]
        cmd += ["--rank", str(args.rank), "--device", args.device, "--seed", str(args.seed)]
        cmd += ["--max-source-tokens", args.max_source_tokens, "--update-rows", args.update_rows]
        cmd += ["--group-targets"] if args.group_targets else []
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
