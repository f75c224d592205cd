"""The ``pdserve`` command.

``pdserve generate "text"`` streams a completion from the offline engine (prefill and
decode in this process) with the built-in model unless ``--model`` names a checkpoint.
``pdserve model NAME`` builds a built-in checkpoint and prints its folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="checkpoint folder (Hugging Face format) or built-in 'tiny' / 'small'")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="token budget of one engine step (prefill chunk size)")


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine import SamplingParams
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.engine import Engine

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()),
        )
        engine = Engine(EngineConfig(
            model=args.model, dtype=args.dtype, device=args.device,
            cache=CacheConfig(block_size=args.block_size),
            scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens),
        ))
        engine.add_request("cli-0", args.prompt, params)
    except ValueError as exc:
        print(f"pdserve: error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(args.prompt)
    while engine.has_unfinished():
        for out in engine.step():
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
            if out.finished:
                sys.stdout.write("\n")
                print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]",
                      file=sys.stderr)
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from engine.model.builtin import builtin_checkpoint

    print(builtin_checkpoint(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt (offline engine)")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    _add_engine_args(gen)
    gen.set_defaults(func=_cmd_generate)

    model = sub.add_parser("model", help="build a built-in checkpoint and print its folder")
    model.add_argument("name", choices=["tiny", "small"])
    model.set_defaults(func=_cmd_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
