"""The ``memtx`` command line: ``train``, ``eval``, ``generate``, ``list``, ``bench``.

.. code-block:: text

    memtx train                                   # the built-in recall task, a few minutes on CPU
    memtx train --data text.txt --preset small --steps 2000 --out runs/text
    memtx train --config run.toml --lr 1e-3       # TOML file, then command-line overrides
    memtx train --out runs/text --resume          # continue the latest checkpoint exactly
    torchrun --nproc_per_node=2 -m memtx train --data text.txt --out runs/ddp
    memtx eval runs/text                          # bpc (or task accuracy), memory carried vs wiped
    memtx generate runs/text --prompt "ROMEO:"    # streams the continuation
    memtx list                                    # architectures, presets, tasks
    memtx bench recall                            # which memory recalls furthest (~1 hour)
    memtx bench lm --data text.txt                # bpc at equal time and tokens
    memtx bench speed --reference                 # tokens/s and memory, vs reference packages

Every field of :class:`memtx.training.RunConfig` and of the chosen architecture's config is an
option (``--mem-len 256``); ``memtx train --help --model NAME`` lists them. Progress goes to
stderr (a bar only on a terminal); the final summary goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from memtx.errors import MemtxError, NonFiniteLossError


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- list ---------------------------------------------------------------------------------------
def _cmd_list(args: argparse.Namespace) -> int:
    import memtx
    from memtx.training.run import PRESETS, TASK_PREFIX, TASKS

    print("architectures:")
    for name in memtx.available():
        cls = memtx.model_class(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        print(f"  {name:16s} {doc[0] if doc else ''}")
    print("presets (--preset NAME; model fields given explicitly win):")
    for name, values in PRESETS.items():
        print(f"  {name:16s} " + " ".join(f"{k}={v}" for k, v in values.items()))
    print("tasks (--data task:NAME):")
    for name, doc in TASKS.items():
        print(f"  {TASK_PREFIX + name:16s} {doc}")
    print("text: --data PATH (a file or a folder of files) or --data enwik8")
    return 0


# -- train --------------------------------------------------------------------------------------
def _train_parser(model: str) -> argparse.ArgumentParser:
    from memtx.training.run import RunConfig, model_field_types, run_field_types

    parser = argparse.ArgumentParser(
        prog="memtx train",
        description="Train a memory-augmented transformer. With no options: the built-in "
        "associative-recall task, which shows memory at work in a few minutes on a CPU.",
    )
    parser.add_argument("--config", help="TOML file of run fields ([model_config] table: model fields)")
    parser.add_argument("--out", help="run directory (default: runs/<data>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the latest checkpoint in --out exactly")
    run_group = parser.add_argument_group("run fields")
    defaults = RunConfig.__dataclass_fields__
    for name, tp in run_field_types().items():
        default = defaults[name].default
        run_group.add_argument(f"--{name.replace('_', '-')}", dest=f"run.{name}", metavar="VALUE",
                               help=f"default {default!r}")
    model_group = parser.add_argument_group(f"model fields of {model}")
    for name in model_field_types(model):
        model_group.add_argument(f"--{name.replace('_', '-')}", dest=f"model.{name}",
                                 metavar="VALUE")
    return parser


def _parse_train_args(argv: list[str]) -> tuple[Any, Path | None, bool]:
    from memtx.training.run import RunConfig, load_toml, merge_config

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    pre.add_argument("--config")
    pre.add_argument("--out")
    pre.add_argument("--resume", action="store_true")
    known, _ = pre.parse_known_args(argv)

    toml_values: dict[str, Any] = {}
    if known.resume:
        if not known.out:
            raise SystemExit("memtx train: --resume needs --out RUN_DIRECTORY")
        saved = Path(known.out) / "config.toml"
        if saved.is_file():
            toml_values = load_toml(saved)
    if known.config:
        toml_values.update(load_toml(known.config))
    model = known.model or toml_values.get("model", RunConfig.model)
    from memtx.registry import model_class

    model_class(model)  # unknown architecture: a clear error before building the parser
    parser = _train_parser(model)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        import difflib

        options = [a for a in parser._option_string_actions if a.startswith("--")]
        flag = unknown[0].split("=")[0]
        hint = difflib.get_close_matches(flag, options, n=1)
        suggestion = f" Did you mean {hint[0]}?" if hint else ""
        from memtx.errors import ConfigError

        raise ConfigError(f"unknown option {unknown[0]!r}.{suggestion} "
                          "(`memtx train --help` lists every option)")
    cli_values = {}
    for dest, value in vars(args).items():
        if value is None or "." not in dest:
            continue
        cli_values[dest.split(".", 1)[1]] = value
    run = merge_config(toml_values=toml_values, cli_values=cli_values)
    out = Path(args.out) if args.out else None
    return run, out, args.resume


def _cmd_train(argv: list[str]) -> int:
    from memtx.training.loop import train

    run, out, resume = _parse_train_args(argv)
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = run.task_name if run.is_task else Path(run.data).stem
        out = Path("runs") / f"{name}-{stamp}"
    result = train(run, out, resume=resume, print_fn=lambda s: print(s, flush=True))
    if result.final_eval:
        print(f"finished {result.step} steps in {result.seconds:.0f}s; checkpoint "
              f"{result.checkpoint}", flush=True)
    return 0


# -- eval ---------------------------------------------------------------------------------------
def _load_run(path: str) -> tuple[Any, Any, Path, Path]:
    """(model, run config, checkpoint dir, run dir) from a run or checkpoint directory."""
    import memtx
    from memtx.training.checkpoint import CHECKPOINT_DIR, resolve_checkpoint
    from memtx.training.run import RunConfig, load_toml

    checkpoint = resolve_checkpoint(path)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else checkpoint
    config_file = run_dir / "config.toml"
    if config_file.is_file():
        run = RunConfig.from_dict(load_toml(config_file))
    else:
        from memtx.training.checkpoint import read_trainer_state

        run = RunConfig.from_dict(read_trainer_state(checkpoint)["run_config"])
    model = memtx.load(checkpoint)
    return model, run, checkpoint, run_dir


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from memtx.training.loop import (
        evaluate, format_final_eval, load_data, make_task, run_final_eval,
    )

    model, run, checkpoint, run_dir = _load_run(args.run)
    if args.data:
        run = run.replace(data=args.data)
    if args.batch_size:
        run = run.replace(eval_batch_size=args.batch_size)
    if run.is_task:
        task = make_task(run.task_name, model.config.seq_len, run.task_distances, run.task_size)
        result = run_final_eval(model, run, task)
    else:
        split = load_data(run.data).split(args.split)
        carried = evaluate(model, split, batch_size=run.eval_batch_size)
        wiped = evaluate(model, split, batch_size=run.eval_batch_size, wipe_memory=True)
        result = {"data_kind": "text", "split": args.split, "bpc_carried": carried.bpc,
                  "bpc_wiped": wiped.bpc, "tokens": carried.tokens}
    print(f"{checkpoint}:")
    print(format_final_eval(result, model.config.seq_len))
    record = {"kind": "cli_eval", "checkpoint": checkpoint.name, **result}
    try:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError:
        pass  # a read-only run directory can still be evaluated
    return 0


# -- generate -----------------------------------------------------------------------------------
def _cmd_generate(args: argparse.Namespace) -> int:
    import codecs

    import torch

    import memtx

    model, _, _, _ = _load_run(args.run)
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise memtx.InputError("--prompt must not be empty")
    prompt_ids = torch.tensor([list(prompt)], dtype=torch.long)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = sys.stdout
    out.write(args.prompt)
    out.flush()

    def emit(token: torch.Tensor) -> None:
        out.write(decoder.decode(bytes([int(token[0])])))
        out.flush()

    generator = torch.Generator().manual_seed(args.seed)
    memtx.generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, generator=generator, callback=emit)
    out.write(decoder.decode(b"", final=True) + "\n")
    out.flush()
    return 0


# -- entry point --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtx", description="memory-augmented transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list architectures, presets and tasks")
    p.set_defaults(func=_cmd_list)
    sub.add_parser("train", help="train a model (memtx train --help)", add_help=False)
    p = sub.add_parser("eval", help="evaluate a run: bpc or task accuracy, memory carried vs wiped")
    p.add_argument("run", help="run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--data", help="evaluate on other data than the run's")
    p.add_argument("--batch-size", type=int, help="evaluation streams (1: exact)")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("generate", help="continue a prompt with a trained model, streamed")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("bench", help="compare the architectures side by side: recall, lm, speed",
                       description="Compare the architectures on the same work. Each command "
                       "writes JSON, a Markdown table and a PNG plot to --out.")
    bench = p.add_subparsers(dest="bench", required=True)
    from memtx.bench import lm, recall, suite

    for name, module, text in (
        ("recall", recall, "accuracy on associative recall by distance, memory carried vs wiped"),
        ("lm", lm, "bits per character on a text file at equal training time and tokens"),
        ("speed", suite, "training/inference/generation speed and peak memory, vs references"),
    ):
        q = bench.add_parser(name, help=text, description=(module.__doc__ or text).split("\n\n")[0])
        module.add_arguments(q)
        q.set_defaults(func=module.main)
    return parser


def console_main() -> int:
    """The ``memtx`` command (and ``python -m memtx``): :func:`main` in a process of its own,
    which may keep freed memory for reuse (faster CPU training steps; see memtx.allocator)."""
    from memtx.allocator import retain_freed_memory_from_env

    retain_freed_memory_from_env()
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "train":
            return _cmd_train(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except NonFiniteLossError as err:
        _err(f"memtx: error: {err}")
        return 3
    except (MemtxError, FileNotFoundError) as err:
        _err(f"memtx: error: {err}")
        return 2
    except KeyboardInterrupt:
        _err("memtx: interrupted; resume with `memtx train --out RUN --resume`")
        return 130


if __name__ == "__main__":
    sys.exit(console_main())
