"""Training throughput against the plain Hugging Face loop (issue: accelerators), measured side by side.

Every system trains the same backbone on the same batches (real SST-2 training sentences, max length 64,
padded per batch), interleaved step by step so that machine noise hits them alike:

- plain: `AutoModelForSequenceClassification` of the backbone, AdamW, linear schedule, gradient clipping —
  the loop a user writes (or `transformers.Trainer` runs) without early exiting;
- de3, pabee: our Trainer's own training step (`Trainer.train_step`) for the recipe;
- deebert stage 1 / stage 2: the two stages of the DeeBERT recipe.

Reported: samples/s of each and its ratio to the plain loop, the per-step breakdown (data and collation,
forward, backward, optimizer) from a second, phase-synchronised pass, and what our loop does besides steps —
dev scoring once per epoch, the best checkpoint, and the training-state writes every --save-every-steps —
as a share of an epoch of the demo's size.

    .venv/bin/python benchmarks/train_throughput.py                           # CPU, MiniLM-L6, fp32
    .venv/bin/python benchmarks/train_throughput.py --device cuda --backbone mpnet-base --precision bf16

Writes results/train_throughput/<backbone>-<device>-<precision>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup  # noqa: E402

from de3bert.apps.bench import running_order  # noqa: E402
from de3bert.data import Collator, encode_examples, load_split, subsample  # noqa: E402
from de3bert.devices import resolve_device, resolve_precision, synchronize  # noqa: E402
from de3bert.exits.outputs import collect_layer_outputs  # noqa: E402
from de3bert.model.backbones import resolve_backbone  # noqa: E402
from de3bert.model.config import ExitHeadConfig  # noqa: E402
from de3bert.model.modeling import EarlyExitModel  # noqa: E402
from de3bert.training import RECIPES  # noqa: E402
from de3bert.training.arguments import TrainingArguments  # noqa: E402
from de3bert.training.distributed import Placement, training_accelerator  # noqa: E402
from de3bert.training.phase_timer import PhaseTimer  # noqa: E402
from de3bert.training.trainer import Trainer  # noqa: E402

RESULTS = Path("results") / "train_throughput"
PHASES = ("data", "forward", "backward", "optimizer")
# targets of the issue: samples/s relative to the plain loop
TARGETS = {"de3": 0.75, "pabee": 0.85, "deebert stage 1": 0.85, "deebert stage 2": 0.85}
DEMO_STEPS_PER_EPOCH = 225  # `make demo`: 7,200 SST-2 sentences in batches of 32


class PlainLoop:
    """The usual fine-tuning loop of a Hugging Face sequence classifier, phases timed like our trainer's."""

    def __init__(self, backbone: str, args: TrainingArguments, examples, total_steps: int):
        self.placement = Placement.resolve(args.device, args.precision)
        self.accelerator, self.scaler = training_accelerator(self.placement), self.placement.grad_scaler()
        model = AutoModelForSequenceClassification.from_pretrained(resolve_backbone(backbone), num_labels=2)
        decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
        rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}], lr=args.learning_rate)
        self.scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * total_steps), total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.model.train()
        self.collator, self.examples, self.args = Collator(examples.tokenizer), examples.encoded, args
        self.timer = PhaseTimer(enabled=False)

    def step(self, indices: list[int]) -> torch.Tensor:
        """One optimizer step on a batch; the loss as a device tensor."""
        with self.timer.phase("data"):
            batch = self.collator([self.examples[i] for i in indices])
            batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}
        with self.timer.phase("forward"), self.placement.autocast():
            loss = self.model(**batch).loss
        with self.timer.phase("backward"):
            self.accelerator.backward(self.scaler.scale(loss))
        with self.timer.phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class OurStep:
    """One stage of one of our recipes, stepped through `Trainer.train_step`."""

    def __init__(self, trainer: Trainer, stage: int):
        self.trainer, self.run = trainer, trainer.start_stage(stage)
        self.run.model.train()

    @property
    def timer(self) -> PhaseTimer:
        """The trainer's phase timer."""
        return self.trainer.timer

    @timer.setter
    def timer(self, value: PhaseTimer) -> None:
        self.trainer.timer = value

    def step(self, indices: list[int]) -> torch.Tensor:
        """One optimizer step on a batch; the loss as a device tensor."""
        return self.trainer.train_step(self.run, indices)


class Examples:
    """Encoded training sentences and the tokenizer they were encoded with."""

    def __init__(self, tokenizer, encoded):
        self.tokenizer, self.encoded = tokenizer, encoded


def build_systems(backbone: str, args: TrainingArguments, examples: Examples, dev, total_steps: int,
                  workdir: Path) -> dict:
    """The plain loop and every stage of our recipes, each with its own freshly loaded model and optimizer."""
    systems = {"plain": PlainLoop(backbone, args, examples, total_steps)}
    task = load_split("sst2", "dev")[0]
    for recipe in ("de3", "pabee", "deebert"):
        for stage in range(len(RECIPES[recipe].stages)):
            heads = ExitHeadConfig(prototype_dim=None if RECIPES[recipe].prototypes else 0)
            model = EarlyExitModel.from_backbone(backbone, "sst2", list(task.labels), heads, args.max_length)
            trainer = Trainer(model, TrainingArguments(**{**args.to_dict(), "recipe": recipe,
                                                          "output_dir": str(workdir / f"{recipe}-{stage}")}),
                              task, examples.encoded, dev, dev[:64])
            name = recipe if len(RECIPES[recipe].stages) == 1 else f"{recipe} stage {stage + 1}"
            systems[name] = OurStep(trainer, stage)
    return systems


def time_steps(systems: dict, batches: list[list[int]], device: torch.device, warmup: int) -> dict[str, list[float]]:
    """Seconds of every step of every system, interleaved step by step in a fresh random order every step."""
    seconds = {name: [] for name in systems}
    for index, batch in enumerate(batches):
        for name in running_order(list(systems), index, 0):
            synchronize(device)
            started = time.perf_counter()
            systems[name].step(batch).item()  # reading the loss waits for the step, as a logging loop would
            if index >= warmup:
                seconds[name].append(time.perf_counter() - started)
    return seconds


def breakdown(systems: dict, batches: list[list[int]], device: torch.device) -> dict[str, dict[str, float]]:
    """Milliseconds per step in each phase, from a pass whose phases wait for the device at their boundaries."""
    for system in systems.values():
        system.timer = PhaseTimer(device)
    for batch in batches:
        for system in systems.values():
            system.step(batch)
    result = {name: {phase: 1000 * s.timer.seconds.get(phase, 0.0) / len(batches) for phase in PHASES}
              for name, s in systems.items()}
    for system in systems.values():
        system.timer = PhaseTimer(enabled=False)
    return result


def extras(system: OurStep, dev, step_seconds: float, save_every_steps: int, device: torch.device) -> dict:
    """What our loop does besides steps, in seconds and as a share of a demo-sized epoch."""
    trainer, run = system.trainer, system.run
    unwrapped = trainer.accelerator.unwrap_model(run.model)
    synchronize(device)
    started = time.perf_counter()
    collect_layer_outputs(unwrapped, dev, trainer.args.eval_batch_size)
    scoring = time.perf_counter() - started
    started = time.perf_counter()
    trainer._save(calibrate_policies=False)
    checkpoint = time.perf_counter() - started
    trainer.best_state = {k: v.clone() for k, v in unwrapped.state_dict().items()}  # a state carries the best too
    started = time.perf_counter()
    trainer._save_state(run, (0, 1, 1), list(range(len(trainer.train_examples))), None)
    state_blocking = time.perf_counter() - started
    trainer.state_writer.wait()
    state_total = time.perf_counter() - started
    epoch = DEMO_STEPS_PER_EPOCH * step_seconds
    state_share = state_blocking / (save_every_steps * step_seconds + state_blocking)
    return {"scoring_s": scoring, "dev_examples": len(dev), "checkpoint_s": checkpoint,
            "state_write_blocking_s": state_blocking, "state_write_total_s": state_total,
            "state_bytes": Path(trainer.args.output_dir, "training_state", "state.pt").stat().st_size,
            "scoring_share_of_demo_epoch": scoring / (epoch + scoring),
            "checkpoint_share_of_demo_epoch": checkpoint / (epoch + checkpoint),
            "state_share_at_save_every_steps": state_share,
            "state_share_if_written_in_the_loop": state_total / (save_every_steps * step_seconds + state_total)}


def markdown(report: dict) -> str:
    """The throughput table and the breakdown."""
    lines = [f"**{report['backbone']}, {report['device']} ({report['device_name']}), {report['precision']}, batch "
             f"{report['batch_size']}, max length {report['max_length']}, {report['threads']} threads** — "
             f"{report['steps']} timed steps per system, interleaved\n",
             "| system | samples/s | vs plain | target | ms/step: data | forward | backward | optimizer |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in report["systems"].items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"≥ {target:.2f} {'met' if row['ratio_to_plain'] >= target else 'MISSED'}"
        phases = report["breakdown_ms"][name]
        lines.append(f"| {name} | {row['samples_per_s']:.1f} | {row['ratio_to_plain']:.2f} | {verdict} | "
                     + " | ".join(f"{phases[p]:.1f}" for p in PHASES) + " |")
    extra = report["de3_extras"]
    lines += ["", f"Besides steps (de3, {extra['dev_examples']} dev inputs scored per epoch; demo epoch = "
                  f"{DEMO_STEPS_PER_EPOCH} steps): dev scoring {extra['scoring_s']:.1f} s "
                  f"({100 * extra['scoring_share_of_demo_epoch']:.1f} % of an epoch), best checkpoint "
                  f"{extra['checkpoint_s']:.1f} s ({100 * extra['checkpoint_share_of_demo_epoch']:.1f} %), "
                  f"training state ({extra['state_bytes'] / 1e6:.0f} MB) every {report['save_every_steps']} steps: "
                  f"{extra['state_write_blocking_s']:.2f} s in the loop "
                  f"({100 * extra['state_share_at_save_every_steps']:.2f} % of training time; written in the "
                  f"loop it would take {extra['state_write_total_s']:.2f} s, "
                  f"{100 * extra['state_share_if_written_in_the_loop']:.2f} %)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per system (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per system first")
    parser.add_argument("--breakdown-steps", type=int, default=10, help="steps of the phase-synchronised pass")
    parser.add_argument("--save-every-steps", type=int, default=200, help="as `de3bert train --save-every-steps`")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--data-dir", help="GLUE folder (default: $GLUE_DIR, else ../shared/data/glue)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    batches_needed = args.warmup + args.steps + args.breakdown_steps
    task, train_examples = load_split("sst2", "train", args.data_dir)
    train_examples = subsample(train_examples, batches_needed * args.batch_size, seed=0)
    dev_examples = load_split("sst2", "dev", args.data_dir)[1]
    with tempfile.TemporaryDirectory() as workdir:
        training = TrainingArguments(output_dir=workdir, batch_size=args.batch_size, max_length=args.max_length,
                                     device=args.device, precision=precision, progress=False,
                                     save_every_steps=args.save_every_steps)
        probe = EarlyExitModel.from_backbone(args.backbone, "sst2", list(task.labels), max_length=args.max_length)
        examples = Examples(probe.tokenizer, encode_examples(probe.tokenizer, train_examples, args.max_length))
        dev = encode_examples(probe.tokenizer, dev_examples, args.max_length)
        del probe
        order = torch.randperm(len(train_examples)).tolist()
        batches = [order[i * args.batch_size:(i + 1) * args.batch_size] for i in range(batches_needed)]
        systems = build_systems(args.backbone, training, examples, dev, batches_needed, Path(workdir))
        seconds = time_steps(systems, batches[:args.warmup + args.steps], device, args.warmup)
        phases = breakdown(systems, batches[args.warmup + args.steps:], device)
        rows = {name: {"samples_per_s": args.batch_size / statistics.median(s), "median_step_s": statistics.median(s),
                       "mean_step_s": statistics.fmean(s)} for name, s in seconds.items()}
        for row in rows.values():
            row["ratio_to_plain"] = row["samples_per_s"] / rows["plain"]["samples_per_s"]
        report = {"backbone": args.backbone, "device": str(device),
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                  "precision": precision, "batch_size": args.batch_size, "max_length": args.max_length,
                  "threads": args.threads, "steps": args.steps, "save_every_steps": args.save_every_steps,
                  "mean_tokens_per_input": statistics.fmean(len(e.input_ids) for e in examples.encoded),
                  "systems": rows, "breakdown_ms": phases, "targets": TARGETS,
                  "de3_extras": extras(systems["de3"], dev, rows["de3"]["median_step_s"], args.save_every_steps,
                                       device)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{args.backbone}-{device.type}-{precision}"
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
