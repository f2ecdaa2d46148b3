"""`de3bert` command line: train | evaluate | export | predict | bench | serve. Thin: it parses and calls the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from de3bert.errors import De3bertError

DATA_HELP = ("folder in the official GLUE layout (<dir>/<TASK>/train.tsv, dev.tsv); default: $GLUE_DIR, "
             "else ../shared/data/glue")
RUNTIME_HELP = ("torch (PyTorch) or onnx (ONNX Runtime, on a folder written by `de3bert export`); default: the one "
                "the folder was written for")
HUB_HELP = "read the task from a Hugging Face datasets id instead (e.g. nyu-mll/glue; needs internet and `datasets`)"


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max([len(c), *(len(_fmt(r.get(c))) for r in rows)]) for c in columns}  # rows may be none
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _policy(args) -> "ExitPolicy | None":
    from de3bert.policies import ExitPolicy

    if args.criterion is None:
        return None
    return ExitPolicy(args.criterion, threshold=args.threshold, patience=args.patience, lam=args.lam)


# the train options that may accompany --resume: where the data and the run are now, and progress bars
RESUME_OPTIONS = ("resume", "data_dir", "no_progress", "device")
# the train options that only one kind of data takes
DATA_OPTIONS = {
    "--task": ("data_dir", "hub_dataset"),
    "--train-file": ("validation_file", "text_column", "text_pair_column", "label_column", "labels", "regression"),
    "--dataset": ("dataset_config", "train_split", "validation_split", "text_column", "text_pair_column",
                  "label_column", "labels", "regression"),
}


def _given(args, names) -> list[str]:
    """The train options among `names` set to something other than their defaults, as written on the command line."""
    defaults = vars(build_parser().parse_args(["train"]))
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) != defaults[name]]


def _data_source(args) -> "DataSource":
    """The data the train options name: a GLUE task, the user's files or a `datasets` dataset — exactly one."""
    from de3bert.data import Columns, DatasetSource, FileSource, GlueSource

    chosen = [option for option in DATA_OPTIONS if getattr(args, option[2:].replace("-", "_")) is not None]
    if len(chosen) != 1:
        raise De3bertError("give one of --task (a GLUE task), --train-file (your .csv, .tsv or .jsonl) and --dataset "
                           "(a `datasets` id or folder)" + (f", not {' and '.join(chosen)}" if chosen else ""))
    kind = chosen[0]
    foreign = _given(args, sorted({n for k, names in DATA_OPTIONS.items() if k != kind for n in names}
                                  - set(DATA_OPTIONS[kind])))
    if foreign:
        raise De3bertError(f"{' '.join(foreign)} do{'es' if len(foreign) == 1 else ''} not go with {kind}")
    if kind == "--task":
        return GlueSource(args.task, args.data_dir, args.hub_dataset)
    labels = None if args.labels is None else tuple(label.strip() for label in args.labels.split(","))
    user = dict(columns=Columns(args.text_column, args.text_pair_column, args.label_column), labels=labels,
                regression=args.regression)
    if kind == "--train-file":
        return FileSource(args.train_file, args.validation_file, **user)
    return DatasetSource(args.dataset, args.dataset_config, args.train_split, args.validation_split, **user)


def cmd_train(args) -> None:
    """Train a model, or continue a stopped run with --resume (with the options saved in its folder)."""
    from de3bert.modeling import ExitHeadConfig
    from de3bert.training import TrainingArguments, process_state, resume, train

    if args.resume:
        repeated = _given(args, [name for name in vars(args) if name not in RESUME_OPTIONS])
        if repeated:
            raise De3bertError("--resume continues a run with the options it was started with; "
                               f"drop {' '.join(repeated)}")
        result = resume(args.resume, args.data_dir, progress=not args.no_progress,
                        device=None if args.device == "auto" else args.device)
    else:
        if args.output is None:
            raise De3bertError("give --output and the data (--task, --train-file or --dataset), or --resume DIR "
                               "to continue a stopped run")
        source = _data_source(args)
        training_args = TrainingArguments(
            output_dir=args.output, recipe=args.recipe, epochs=args.epochs, learning_rate=args.learning_rate,
            head_learning_rate=args.head_learning_rate, batch_size=args.batch_size, seed=args.seed, alpha=args.alpha,
            beta=args.beta, target_speedup=args.target_speedup, lam=args.lam, max_train_samples=args.max_train_samples,
            calibration_fraction=args.calibration_fraction, validation_fraction=args.validation_fraction,
            max_length=args.max_length, save_every_steps=args.save_every_steps, criterion=args.criterion,
            device=args.device, precision=args.precision, progress=not args.no_progress)
        heads = ExitHeadConfig(prototype_dim=args.prototype_dim, distance=args.distance, dropout=args.head_dropout,
                               pooling=args.pooling, prototypes=args.prototypes,
                               prototype_momentum=args.prototype_momentum)
        result = train(source, args.model, training_args, heads=heads)
    process_state(args.device).print(f"best checkpoint (selection score {result.best_score:.4f}) saved to "
                                     f"{result.output_dir}")


def cmd_evaluate(args) -> None:
    from de3bert.evaluation import evaluate_checkpoint

    output = Path(args.output) if args.output else Path(args.checkpoint) / "evaluation"
    report = evaluate_checkpoint(args.checkpoint, args.task, args.data_dir, args.hub_dataset, output,
                                 pcee_patience=args.pcee_patience, progress=not args.no_progress, split=args.split,
                                 eval_file=args.eval_file, text_column=args.text_column,
                                 text_pair_column=args.text_pair_column, label_column=args.label_column,
                                 device=args.device, precision=args.precision)
    metric = report["metric"]
    print(f"\n{report['task']} {report['evaluated_on']} ({report['eval_examples']} examples): {metric} of every exit")
    print(_table(report["layer_metrics"], list(report["layer_metrics"][0])))
    if report["oracle"]:
        o = report["oracle"]
        print(f"\noracle (shallowest correct exit): {metric} {o['metric']:.4f} at speed-up {o['speedup']:.2f}x")
    print(f"\nthresholds calibrated on {report['calibration_split']} ({report['calibration_examples']} examples), "
          f"measured on {report['evaluated_on']}:")
    rows = [r for r in report["calibrated"] if "speedup" in r]
    print(_table(rows, ["policy", "target_speedup", "threshold", "patience", "speedup", "metric", "mean_exit_layer"]))
    for row in report["calibrated"]:
        if "error" in row:
            print(f"  {row['policy']} at {row['target_speedup']}x: {row['error']}")
    if report["separation"]:
        print("\nhow well each indicator separates right from wrong answers (AUROC per layer, 0.5 = not at all):")
        print(_table([{"indicator": c, **{f"L{m + 1}": v for m, v in enumerate(scores)}}
                      for c, scores in report["separation"].items()],
                     ["indicator"] + [f"L{m + 1}" for m in range(report["num_layers"])]))
    print(f"\nfull-depth {metric}: {report['full_depth']:.4f}; sweeps, tables and plot written to {output}")


def cmd_predict(args) -> None:
    import json

    from de3bert.batch_predict import predict_file
    from de3bert.data import recorded_columns
    from de3bert.engine import EarlyExitEngine
    from de3bert.runtimes import load_model

    model = load_model(args.checkpoint, args.runtime, device=args.device, precision=args.precision)
    engine = EarlyExitEngine(model, _policy(args), batch_size=args.batch_size)
    if args.input is not None:
        if args.output is None:
            raise De3bertError("--input needs --output (a .jsonl, .tsv or .csv file to write)")
        columns = recorded_columns(model.config.training, model.config.task).overridden(args.text_column,
                                                                                        args.text_pair_column)
        count = predict_file(engine, args.input, args.output, columns.text, columns.text_pair,
                             progress=not args.no_progress)
        print(f"wrote {count} predictions to {args.output}")
        return
    if args.text is None:
        raise De3bertError("give --text (and --text-pair for pair tasks), or --input FILE --output FILE")
    pairs = [args.text_pair] if args.text_pair is not None else None
    for prediction in engine.predict([args.text], pairs):
        print(json.dumps(prediction.__dict__))


def cmd_bench(args) -> None:
    import json

    from de3bert.benchmark import BenchSettings, plot_benchmark, run_benchmark

    settings = BenchSettings(criterion=args.criterion, targets=tuple(args.targets), latency_inputs=args.latency_inputs,
                             throughput_inputs=args.throughput_inputs, batch_size=args.batch_size,
                             pool_size=args.pool_size, repeats=args.repeats, threads=args.threads, split=args.split,
                             runtime=args.runtime, device=args.device, precision=args.precision)
    report = run_benchmark(args.checkpoint, args.task, args.data_dir, settings, progress=not args.no_progress)
    output = Path(args.output) if args.output else Path(args.checkpoint) / "bench"
    output.mkdir(parents=True, exist_ok=True)
    (output / "wallclock.json").write_text(json.dumps(report, indent=2))
    plot_benchmark(report, output / "wallclock.png")
    print(f"{report['task']} {report['split']}: {report['latency_inputs']} inputs at batch 1, "
          f"{report['throughput_inputs']} in batches of {args.batch_size} and in pools of {args.pool_size}, "
          f"{args.threads} threads, medians of {args.repeats}; speed-ups over {report['reference']}")
    print(_table(report["rows"], ["system", "latency_p50_ms", "latency_p95_ms", "layer_speedup_batch1",
                                  "wallclock_speedup_batch1", "metric"]))
    print(_table(report["rows"], ["system", "layer_speedup_batched", "throughput_per_s", "wallclock_speedup_batched",
                                  "throughput_pooled_per_s", "wallclock_speedup_pooled"]))
    for runtime, milliseconds in report["overhead"]["measured_head_and_policy_ms_per_layer_batch1"].items():
        print(f"exit heads + policy on {runtime}: {milliseconds:.3f} ms per layer at batch 1")
    print(f"heads hold {100 * report['overhead']['overhead_fraction']:.1f}% of the backbone's parameters; "
          f"written to {output}/wallclock.json and wallclock.png")


def cmd_export(args) -> None:
    """Export a checkpoint as ONNX graphs for ONNX Runtime."""
    from de3bert.onnx_export import export_checkpoint

    measure = args.quantize is not None or args.measure
    info = export_checkpoint(args.checkpoint, args.output, args.quantize, measure, args.data_dir)
    print(f"exported {args.checkpoint} to {args.output} ({info.quantization or 'float32'} graphs; largest relative "
          f"difference from PyTorch {max(info.validation.values()):.1e})")
    if info.exit_metrics:
        print("dev metric of every exit (and of the calibrated policy, with its layer speed-up):")
        print(_table(info.exit_metrics, list(info.exit_metrics[-1])))
    print(f"run it with: de3bert serve {args.output}  (or predict / bench {args.output} --runtime onnx)")


def cmd_serve(args) -> None:
    """Serve a checkpoint over HTTP until interrupted."""
    from de3bert.serving import ServiceSettings, serve

    settings = ServiceSettings(args.checkpoint, args.runtime, args.device, args.precision,
                               max_batch_size=args.max_batch_size,
                               max_wait_ms=args.max_wait_ms, micro_batching=not args.no_micro_batching,
                               max_inputs=args.max_inputs, max_chars=args.max_chars, max_body_bytes=args.max_body_bytes)
    serve(settings, args.host, args.port, args.workers)


def _add_device_options(parser: argparse.ArgumentParser, training: bool = False) -> None:
    what = "mixed precision of forward and backward passes" if training else "precision of the weights"
    parser.add_argument("--device", default="auto",
                        help="where to run: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help=f"{what}: auto is fp32 on the CPU and bf16 on a GPU (fp16 where it has no bf16)")


def _add_policy_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("exit policy (default: the one calibrated into the checkpoint)")
    group.add_argument("--criterion", choices=["edr", "entropy", "confidence", "dr", "patience", "pcee",
                                                "regression-patience"], help="exit criterion")
    group.add_argument("--threshold", type=float, default=0.5, help="threshold τ in [0, 1] (tolerance for regression)")
    group.add_argument("--patience", type=int, default=1, help="consecutive confident layers needed to exit")
    group.add_argument("--lam", type=float, default=1.0, help="λ of the hybrid indicator EDR")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each option's default to its help, unless it has none or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        """The option's help, with its default where that adds something."""
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `de3bert` command."""
    parser = argparse.ArgumentParser(prog="de3bert", description=(
        "Distance-enhanced early exiting (DE³-BERT) for BERT-family classifiers: train, evaluate, predict."))
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune an early-exit model on your data, a dataset or a GLUE task",
                           formatter_class=HelpFormatter)
    data = train.add_argument_group("data: exactly one of --train-file, --dataset and --task")
    data.add_argument("--train-file", help="your training data: a .csv, .tsv or .jsonl file with named columns")
    data.add_argument("--validation-file",
                      help="your validation data (same columns), to pick the best epoch (default: a stratified "
                           "--validation-fraction of the training file is held out for that)")
    data.add_argument("--dataset", help="a Hugging Face `datasets` id (needs internet and `pip install datasets`) or "
                                        "a local folder of data files (train.csv, validation.csv, ...)")
    data.add_argument("--dataset-config", help="configuration (subset) name of --dataset")
    data.add_argument("--train-split", default="train", help="split of --dataset to train on")
    data.add_argument("--validation-split",
                      help="split of --dataset that picks the best epoch (default: its 'validation' split if it has "
                           "one, else a held-out slice of the training split)")
    data.add_argument("--text-column", default="text", help="column holding the text")
    data.add_argument("--text-pair-column", help="column holding the second text, for pair tasks")
    data.add_argument("--label-column", default="label", help="column holding the label (or the score)")
    data.add_argument("--labels",
                      help="the class labels in output order, separated by commas, e.g. bug,feature,question "
                           "(default: the labels found in the training data, sorted)")
    data.add_argument("--regression", action="store_true", help="the label column holds a number to predict")
    data.add_argument("--validation-fraction", type=float, default=0.1,
                      help="share of the training data held out, stratified by class, to pick the best epoch when "
                           "there is no validation file or split")
    data.add_argument("--task", help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
    train.add_argument("--model", default="minilm-l6",
                       help="backbone: minilm-l6 (embedded), mpnet-base (12 layers), a local folder or hub id")
    train.add_argument("--recipe", default="de3", choices=["de3", "pabee", "deebert"],
                       help="de3: CE+prototype CE+DAR on all layers; pabee: weighted CE; deebert: two stages")
    train.add_argument("--output", help="checkpoint folder to write (required)")
    train.add_argument("--resume", metavar="DIR",
                       help="continue the stopped run whose --output was DIR, with the options it was started with")
    train.add_argument("--save-every-steps", type=int, default=200,
                       help="write the training state (for --resume) every this many optimizer steps and at every "
                            "epoch end (0: epoch ends only)")
    train.add_argument("--epochs", type=int, default=3, help="epochs (per stage)")
    train.add_argument("--learning-rate", type=float, default=5e-5, help="peak learning rate of the backbone")
    train.add_argument("--head-learning-rate", type=float, default=1e-3,
                       help="peak learning rate of the freshly initialized exit heads and prototypes")
    train.add_argument("--batch-size", type=int, default=32,
                       help="training batch size, global: several processes (torchrun) share each batch")
    train.add_argument("--max-length", type=int, default=128, help="max tokens per input (longer is truncated)")
    train.add_argument("--max-train-samples", type=int, default=None, help="train on a fixed random subsample")
    train.add_argument("--calibration-fraction", type=float, default=0.1,
                       help="share of train held out to calibrate thresholds (0: use dev)")
    train.add_argument("--seed", type=int, default=42, help="random seed")
    train.add_argument("--alpha", type=float, default=None, help="prototype CE weight α (de3 default 1; 0 = off)")
    train.add_argument("--beta", type=float, default=None, help="DAR weight β (de3 default 1; 0 = off)")
    train.add_argument("--prototype-dim", type=int, default=None, help="metric space dimension d (default: hidden)")
    train.add_argument("--distance", default="sqeuclidean", choices=["sqeuclidean", "cosine"], help="prototype distance")
    train.add_argument("--prototypes", default="ema", choices=["ema", "learned"],
                       help="class prototypes: running means of each class's embeddings (ema, the paper's) or "
                            "parameters trained by gradient descent (learned)")
    train.add_argument("--prototype-momentum", type=float, default=0.1,
                       help="γ of the running means: P ← (1 − γ)·P + γ·(batch mean of the class)")
    train.add_argument("--head-dropout", type=float, default=0.1, help="dropout in the exit heads")
    train.add_argument("--pooling", default=None, choices=["cls", "mean"],
                       help="what each exit head reads: the [CLS] state (the paper) or the mean over tokens "
                            "(default: the backbone's own pretrained pooling, mean for minilm-l6 and mpnet-base)")
    train.add_argument("--target-speedup", type=float, default=2.0,
                       help="layer speed-up the checkpoint's default policy is calibrated to")
    train.add_argument("--lam", type=float, default=1.0, help="λ of EDR")
    train.add_argument("--criterion", choices=["edr", "entropy", "confidence", "dr", "patience", "pcee",
                                                "regression-patience"],
                       help="criterion of the default exit policy (default: the one that scores best on the "
                            "calibration split at --target-speedup; the recipe's own on a tie)")
    data.add_argument("--data-dir", help=DATA_HELP)
    data.add_argument("--hub-dataset", help=HUB_HELP)
    _add_device_options(train, training=True)
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="per-layer metrics, oracle, threshold sweeps, calibration, plot",
                              formatter_class=HelpFormatter)
    evaluate.add_argument("checkpoint", help="checkpoint folder written by `de3bert train`")
    evaluate.add_argument("--eval-file", help="a labelled .csv, .tsv or .jsonl file to score the model on (default: "
                                              "the dev or validation data of its training run)")
    evaluate.add_argument("--text-column", help="text column of --eval-file (default: the training data's)")
    evaluate.add_argument("--text-pair-column", help="second text column of --eval-file (default: the training data's)")
    evaluate.add_argument("--label-column", help="label column of --eval-file (default: the training data's); labels "
                                                 "may be written as values or as names")
    evaluate.add_argument("--split", default="dev",
                          help="split of the training data to score on instead, e.g. dev_mismatched for MNLI")
    evaluate.add_argument("--task", help="GLUE task to evaluate on (default: the data the checkpoint was trained on)")
    evaluate.add_argument("--output", help="folder for evaluation.json, sweeps.csv, calibrated.csv, tradeoff.png "
                                           "(default: CHECKPOINT/evaluation)")
    evaluate.add_argument("--pcee-patience", type=int, default=2, help="patience t used for PCEE")
    evaluate.add_argument("--data-dir", help=DATA_HELP + " (default: the folder the checkpoint was trained from)")
    evaluate.add_argument("--hub-dataset", help=HUB_HELP)
    _add_device_options(evaluate)
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=cmd_evaluate)

    export = sub.add_parser("export", help="write a checkpoint as ONNX graphs for ONNX Runtime (serve it without "
                                           "PyTorch weights)", formatter_class=HelpFormatter)
    export.add_argument("checkpoint", help="checkpoint folder written by `de3bert train`")
    export.add_argument("--output", required=True, help="folder to write the graphs, config and tokenizer to")
    export.add_argument("--quantize", choices=["int8"],
                        help="dynamic int8 quantization of the graphs (its accuracy is measured on the task's dev "
                             "split)")
    export.add_argument("--measure", action="store_true",
                        help="measure every exit's dev metric in PyTorch and on the graphs (always with --quantize)")
    export.add_argument("--data-dir", help=DATA_HELP)
    export.set_defaults(func=cmd_export)

    predict = sub.add_parser("predict", help="classify a text (or text pair) with early exiting",
                             formatter_class=HelpFormatter)
    predict.add_argument("checkpoint", help="checkpoint folder or exported folder")
    predict.add_argument("--runtime", choices=["torch", "onnx"], help=RUNTIME_HELP)
    predict.add_argument("--text", help="the text to classify")
    predict.add_argument("--text-pair", help="second text, for pair tasks (RTE, MRPC, QNLI, ...)")
    predict.add_argument("--input", help="file of inputs to classify (.tsv, .csv or .jsonl with named columns)")
    predict.add_argument("--text-column", help="column of --input holding the text (default: the training data's)")
    predict.add_argument("--text-pair-column",
                         help="column of --input holding the second text of a pair (default: the training data's)")
    predict.add_argument("--output", help="where to write predictions for --input (.jsonl, .tsv or .csv)")
    predict.add_argument("--batch-size", type=int, default=32, help="inference batch size")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_policy_options(predict)
    _add_device_options(predict)
    predict.set_defaults(func=cmd_predict)
    bench = sub.add_parser("bench", help="measured wall-clock speed-up over the plain model, on PyTorch and ONNX Runtime",
                           formatter_class=HelpFormatter)
    bench.add_argument("checkpoint", help="checkpoint folder, or exported folder (then the ONNX Runtime systems are timed "
                                          "too, next to the PyTorch ones of the checkpoint it was exported from)")
    bench.add_argument("--runtime", choices=["torch", "onnx"], help=RUNTIME_HELP)
    bench.add_argument("--task", help="task whose data is timed (default: the checkpoint's)")
    bench.add_argument("--split", default="dev", help="split to time")
    bench.add_argument("--criterion", help="exit criterion to calibrate (default: the checkpoint's)")
    bench.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0, 3.0], help="layer speed-ups")
    bench.add_argument("--latency-inputs", type=int, default=200, help="inputs timed one at a time")
    bench.add_argument("--throughput-inputs", type=int, help="inputs in the batched runs (default: all)")
    bench.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput runs")
    bench.add_argument("--pool-size", type=int, default=256,
                       help="inputs run layer by layer together in the pooled runs (survivors re-packed)")
    bench.add_argument("--repeats", type=int, default=3, help="repeated passes (medians are reported)")
    bench.add_argument("--threads", type=int, default=2, help="threads of every system (PyTorch and ONNX Runtime)")
    bench.add_argument("--output", help="folder for wallclock.json and wallclock.png (default: CHECKPOINT/bench)")
    bench.add_argument("--data-dir", help=DATA_HELP)
    bench.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device_options(bench)
    bench.set_defaults(func=cmd_bench)
    serve = sub.add_parser("serve", help="HTTP prediction service (FastAPI on uvicorn) with micro-batching",
                           formatter_class=HelpFormatter)
    serve.add_argument("checkpoint", help="checkpoint folder or exported folder")
    serve.add_argument("--runtime", choices=["torch", "onnx"], help=RUNTIME_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    serve.add_argument("--port", type=int, default=8000, help="TCP port")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (each loads the model)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="most inputs merged into one engine call")
    serve.add_argument("--max-wait-ms", type=float, default=0.0,
                       help="longest wait for requests to merge with (0: merge only those already queued)")
    serve.add_argument("--no-micro-batching", action="store_true", help="run each request on its own")
    serve.add_argument("--max-inputs", type=int, default=64, help="most inputs per request")
    serve.add_argument("--max-chars", type=int, default=5000, help="most characters per text")
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body")
    _add_device_options(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `de3bert` console script."""
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging  # imported here so `--help` stays instant

    # --no-progress also silences transformers' own "Loading weights" bar
    (hf_logging.disable_progress_bar if getattr(args, "no_progress", False) else hf_logging.enable_progress_bar)()
    try:
        args.func(args)
    except De3bertError as exc:
        print(f"de3bert {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"de3bert {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
