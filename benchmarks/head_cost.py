"""What an exit decision costs per layer as the number of classes grows (issue: your own data, many classes).

At batch 1 on MiniLM-L6-sized heads (hidden 384, mean pooling, prototype dimension 384) this times, for C = 2, 6
and 50 classes, one layer's exit head and the policy step that reads it — the classifier with the entropy
criterion (DeeBERT), and classifier + prototypical network with the hybrid EDR criterion (DE³, which reads the
distance to every class prototype) — next to one MiniLM-L6 encoder layer run the way the engine runs it. The
pretrained backbone's first layer is timed; the heads are freshly initialized (their cost does not depend on
their weights). Medians over rounds of many calls; pin it to one core for stable numbers:

    taskset -c 1 .venv/bin/python benchmarks/head_cost.py

Writes results/head_cost/head_cost.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from de3bert.exits.policies import ExitPolicy
from de3bert.model.backbones import count_parameters, load_backbone
from de3bert.model.heads import ExitHead

RESULTS = Path("results") / "head_cost"


def per_call_ms(call, calls: int, rounds: int) -> float:
    """Median over rounds of the mean milliseconds of one call (after a warm-up round)."""
    call()
    means = []
    for _ in range(rounds + 1):
        started = time.perf_counter()
        for _ in range(calls):
            call()
        means.append(1000 * (time.perf_counter() - started) / calls)
    return statistics.median(means[1:])


def measure(classes: list[int], tokens: int, calls: int, rounds: int) -> dict:
    """Milliseconds per layer at batch 1: an encoder layer, and head + policy step for each class count."""
    backbone, _ = load_backbone("minilm-l6")
    backbone.eval()
    hidden_size = backbone.hidden_size
    torch.manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size)
    mask = torch.ones(1, tokens, dtype=torch.long)
    context = backbone.context(hidden, mask)
    rows = []
    with torch.inference_mode():
        layer_ms = per_call_ms(lambda: backbone.run_layer(0, hidden, context), calls, rounds)
        for count in classes:
            head = ExitHead(hidden_size, count, hidden_size, "sqeuclidean", 0.1, "mean", "ema").eval()
            head.prototypes.normal_()
            row = {"classes": count, "classifier_parameters": count_parameters(head.pooler)
                   + count_parameters(head.classifier),
                   "prototype_parameters": count_parameters(head.projection) + head.prototypes.numel()}
            for criterion, with_prototypes in (("entropy", False), ("edr", True)):
                policy = ExitPolicy(criterion, threshold=0.0)  # never exits: every layer's decision is computed
                state = policy.initial_state(1)
                ms = per_call_ms(lambda: policy.step(head(hidden, mask, with_prototypes=with_prototypes), state,
                                                     is_last=False), calls, rounds)
                row[f"{criterion}_ms"] = ms
                row[f"{criterion}_share_of_layer"] = ms / layer_ms
            rows.append(row)
    return {"backbone": "minilm-l6", "hidden_size": hidden_size, "tokens": tokens, "batch_size": 1,
            "threads": torch.get_num_threads(), "calls_per_round": calls, "rounds": rounds,
            "encoder_layer_ms": layer_ms, "rows": rows}


def markdown_table(report: dict) -> str:
    """Head + policy cost per layer against one encoder layer, one row per class count."""
    lines = [f"MiniLM-L6 exit head + policy step per layer, batch 1, {report['tokens']} tokens, "
             f"{report['threads']} thread(s); one encoder layer: {report['encoder_layer_ms']:.3f} ms\n",
             "| classes | head parameters (classifier + prototypes) | entropy: ms (share of a layer) | "
             "EDR with prototypes: ms (share of a layer) |", "|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['classes']} | {row['classifier_parameters']:,} + {row['prototype_parameters']:,} | "
                     f"{row['entropy_ms']:.3f} ({100 * row['entropy_share_of_layer']:.1f} %) | "
                     f"{row['edr_ms']:.3f} ({100 * row['edr_share_of_layer']:.1f} %) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Parse options, measure, write JSON and markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 6, 50], help="class counts to time")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per input")
    parser.add_argument("--calls", type=int, default=300, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", default=str(RESULTS), help="folder for head_cost.json and table.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = measure(args.classes, args.tokens, args.calls, args.rounds)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "head_cost.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    (output / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
