"""Benchmark client training throughput: one JSON object per line.

    python -m simulations.bench_train                      # steps, then the federation
    python -m simulations.bench_train --part steps --archs cnn4 --batch-sizes 10
    python -m simulations.bench_train --part federation --rounds 6 --repeats 5
    python -m simulations.bench_train --part federation --precision fp32
    python -m simulations.bench_train --part federation --examples-per-client 3000

``steps``: one line per (arch, batch size, precision, layout): ``images_per_s`` of the
project's own training loop (:meth:`simulations.tasks.ImageClassificationTask.train`) on
random 32×32 images, one thread, after a warm-up call; every combination in this one process
so that the ratios are stable. ``bf16_is_fast`` says whether this machine has native bf16.

``federation``: the same training through the federation (``htfe4``, 20 clients, by default;
any federation of image classifiers with ``--federation``; LocalOnly,
evaluated only after the last round) on Flower's simulation engine, against a plain PyTorch
loop over the same clients and the same batches (same data, augmentation, optimiser, numerics)
in as many one-thread processes as the simulation runs clients at once, its rounds
synchronous like the federation's (a round ends when its last client has trained). Both count
rounds 2 to N (round 1 carries the start of Ray's workers). The two alternate ``--repeats``
times, since this machine's speed drifts by several per cent from one minute to the next:
the throughputs are medians, ``ratio`` the median of the paired federation / plain ratios and
``ratios`` every one. ``federation_rounds`` says where the federation's workers waited
(:func:`idle_breakdown`, medians over the timed rounds). ``--examples-per-client`` caps each
client's share of the data at another number than the federation's, and so sets how much
training a message carries against Flower's fixed costs per message and per round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from mergenet_fl.flower.protocol import NUM_EXAMPLES
from mergenet_fl.flower.runlog import read_lines
from simulations.config import compose
from simulations.federation import build_workload
from simulations.models import build_model
from simulations.numerics import PRECISIONS, Numerics, bf16_is_fast
from simulations.run import simulate
from simulations.tasks import TrainState, get_task, plan_batches

ARCHS = ("cnn4", "convnet5", "convnet6", "resnet8_f512")


def step_throughput(
    arch: str, batch_size: int, numerics: Numerics, steps: int, seed: int = 0
) -> dict:
    """Images per second of ``steps`` training batches of ``arch`` (after a warm-up call)."""
    gen = torch.Generator().manual_seed(seed)
    rows = batch_size * steps
    data = TensorDataset(
        torch.randn(rows, 3, 32, 32, generator=gen), torch.randint(0, 10, (rows,), generator=gen)
    )
    model = build_model(arch, 10, seed=seed)
    task = get_task("image_classification")
    state = TrainState()
    run = dict(batch_size=batch_size, seed=seed, state=state, numerics=numerics)
    task.train(model, data, steps=3, **run)  # warm-up: kernels chosen, buffers allocated
    seconds = task.train(model, data, steps=steps, **run)["train_seconds"]
    return {
        "part": "steps",
        "arch": arch,
        "batch_size": batch_size,
        "precision": numerics.precision,
        "channels_last": numerics.channels_last,
        "steps": steps,
        "ms_per_step": round(1000 * seconds / steps, 2),
        "images_per_s": round(rows / seconds, 1),
    }


def steps_part(archs: list[str], batch_sizes: list[int], steps: int) -> None:
    torch.set_num_threads(1)
    fast = bf16_is_fast(torch.device("cpu"))
    for arch in archs:
        for batch_size in batch_sizes:
            for precision in ("fp32", "bf16"):
                for channels_last in (False, True):
                    numerics = Numerics(precision, channels_last)
                    line = step_throughput(arch, batch_size, numerics, steps)
                    print(json.dumps({**line, "bf16_is_fast": fast, "threads": 1}), flush=True)


def federation_overrides(
    federation: str, rounds: int, precision: str, examples: int | None = None
) -> list[str]:
    """The federation part's run; ``examples`` per client instead of the federation's own."""
    return [
        f"federation={federation}",
        "strategy=local",
        f"num_rounds={rounds}",
        f"evaluate_every={rounds}",
        f"precision={precision}",
        "checkpoint=false",
        *([f"federation.examples_per_client={examples}"] if examples else []),
    ]


def _plain_worker(overrides: list[str], partitions: list[int], rounds: int, queue, barrier) -> None:
    """Train ``partitions`` for rounds 1..``rounds`` as a plain loop, each round ending at
    ``barrier``; put (images, seconds) of rounds 2..N on ``queue``."""
    torch.set_num_threads(1)
    cfg = compose(overrides)
    numerics = cfg.numerics()
    works = {pid: build_workload(cfg, pid) for pid in partitions}
    states = {pid: TrainState() for pid in partitions}
    images, start = 0, 0.0
    for server_round in range(1, rounds + 1):
        if server_round == 2:
            start = time.perf_counter()
        for pid, work in works.items():
            data_seed = cfg.seed * 100_003 + pid * 1009  # as the ClientApp seeds its client
            state = states[pid]
            config = work.task.config
            steps = cfg.local_steps or cfg.local_epochs * -(-len(work.train_set) // cfg.batch_size)
            batches = plan_batches(len(work.train_set), cfg.batch_size, steps, state, data_seed)
            model = work.model.train()
            with numerics.layout(model):
                optimizer = torch.optim.SGD(
                    model.parameters(),
                    lr=work.lr or config.lr,
                    momentum=config.momentum,
                    weight_decay=config.weight_decay,
                )
                if state.optimizer is not None:
                    optimizer.load_state_dict(state.optimizer)
                torch.manual_seed(data_seed + server_round)
                for x, y in DataLoader(work.train_set, batch_sampler=batches):
                    with numerics.autocast(torch.device("cpu")):
                        logits = model(x)
                    loss = F.cross_entropy(logits.float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    images += len(y) if server_round > 1 else 0
                state.optimizer = optimizer.state_dict()
        barrier.wait()
    queue.put((images, time.perf_counter() - start))


def plain_loop(overrides: list[str], num_clients: int, workers: int, rounds: int) -> dict:
    """The plain loop's throughput in ``workers`` processes, clients dealt round-robin."""
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(workers)
    procs = [
        ctx.Process(
            target=_plain_worker,
            args=(overrides, list(range(w, num_clients, workers)), rounds, queue, barrier),
        )
        for w in range(workers)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    images = sum(r[0] for r in results)
    seconds = max(r[1] for r in results)
    return {"images": images, "seconds": round(seconds, 3), "images_per_s": images / seconds}


def federated(overrides: list[str], workers: int) -> dict:
    """Throughput of the same run on Flower's simulation engine: training images of rounds
    2..N over the wall time from the end of round 1's training to the end of round N's; and
    where its ``workers`` waited (:func:`idle_breakdown`)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*overrides, f"output_dir={tmp}"])
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        simulate(cfg, run_dir)
        lines = read_lines(run_dir)
    stages = {
        line["round"]: line["server"]
        for line in lines
        if "server" in line and line.get("stage") == "train"
    }
    seconds = stages[cfg.num_rounds]["stage_end"] - stages[1]["stage_end"]
    trains = [line for line in lines if line.get("stage") == "train" and "group" in line]
    images = cfg.local_epochs * sum(  # every epoch visits each client's every row
        line[NUM_EXAMPLES] for line in trains if line["round"] > 1
    )
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": images / seconds,
        "rounds": [
            idle_breakdown(stages[r], [x for x in trains if x["round"] == r], workers)
            for r in range(2, cfg.num_rounds + 1)
        ],
    }


def idle_breakdown(stage: dict, replies: list[dict], workers: int) -> dict:
    """Where one training stage's ``workers`` waited, from its run log: the stage's wall time,
    the share of ``workers`` × wall time in which no ClientApp ran (``idle``), from the stage's
    start to the first ClientApp's (``to_first_ms``: Flower's queue, Ray's hand-over) and from
    the last ClientApp's end to the stage's (``after_last_ms``: the reply's way back). The
    rest of ``idle`` lies between one message and the next on a worker, and in the workers'
    uneven ends."""
    wall = stage["stage_end"] - stage["stage_start"]
    busy = sum(x["client_seconds"] for x in replies)
    return {
        "wall_ms": 1000 * wall,
        "idle": 1 - busy / (workers * wall),
        "to_first_ms": 1000 * (min(x["started_at"] for x in replies) - stage["stage_start"]),
        "after_last_ms": 1000 * (stage["stage_end"] - max(x["ended_at"] for x in replies)),
    }


def federation_part(
    federation: str, rounds: int, precision: str, repeats: int, examples: int | None
) -> None:
    overrides = federation_overrides(federation, rounds, precision, examples)
    cfg = compose(overrides)
    if cfg.local_steps is not None:
        raise SystemExit("the federation part counts whole local epochs (local_steps is set)")
    if any(c.task != "image_classification" for c in cfg.clients):
        raise SystemExit(f"the plain loop trains image classifiers; {federation} has others")
    workers = max(1, int((os.cpu_count() or 1) // cfg.client_cpus))
    pairs = [
        (federated(overrides, workers), plain_loop(overrides, cfg.num_clients, workers, rounds))
        for _ in range(repeats)
    ]
    rounds_timed = [r for fed, _ in pairs for r in fed["rounds"]]
    fed, plain = (statistics.median(x[i]["images_per_s"] for x in pairs) for i in (0, 1))
    print(
        json.dumps(
            {
                "part": "federation",
                "federation": federation,
                "clients": cfg.num_clients,
                "examples_per_client": cfg.examples_per_client,
                "rounds_measured": rounds - 1,
                "repeats": repeats,
                "workers": workers,
                "precision": cfg.numerics().precision,
                "channels_last": cfg.channels_last,
                "federation_images_per_s": round(fed, 1),
                "plain_images_per_s": round(plain, 1),
                "images": pairs[0][0]["images"],
                "plain_images": pairs[0][1]["images"],
                "ratio": round(
                    statistics.median(f["images_per_s"] / p["images_per_s"] for f, p in pairs), 3
                ),
                "ratios": [round(f["images_per_s"] / p["images_per_s"], 3) for f, p in pairs],
                "federation_rounds": {  # medians over every timed round of every repeat
                    key: round(statistics.median(r[key] for r in rounds_timed), 3)
                    for key in ("wall_ms", "idle", "to_first_ms", "after_last_ms")
                },
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "steps", "federation"), default="all")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 32])
    parser.add_argument("--steps", type=int, default=12, help="timed batches per combination")
    parser.add_argument("--rounds", type=int, default=6, help="federation rounds (2..N timed)")
    parser.add_argument("--federation", default="htfe4", help="an image federation of conf/")
    parser.add_argument(
        "--repeats", type=int, default=3, help="federation and plain loop runs, alternating"
    )
    parser.add_argument(
        "--examples-per-client",
        type=int,
        help="federation.examples_per_client, the cap on each client's share of the data, "
        "instead of the federation's own: more training in a message",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the federation part's clients' precision",
    )
    args = parser.parse_args()
    if args.rounds < 2 or args.repeats < 1:  # round 1 is not timed
        parser.error(f"--rounds must be >= 2 and --repeats >= 1, got {args.rounds}, {args.repeats}")
    if args.examples_per_client is not None and args.examples_per_client < 1:
        parser.error(f"--examples-per-client must be >= 1, got {args.examples_per_client}")
    if args.part in ("all", "steps"):
        steps_part(args.archs, args.batch_sizes, args.steps)
    if args.part in ("all", "federation"):
        federation_part(
            args.federation, args.rounds, args.precision, args.repeats, args.examples_per_client
        )


if __name__ == "__main__":
    main()
