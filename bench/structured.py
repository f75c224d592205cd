"""Structured-output benchmark: engine throughput with a JSON schema vs without, on the same
prompts, and the validity of every constrained output.

One colocated ``Engine`` (the offline ``LLM``), one process. Each repetition runs the 50
(schema, prompt) cases of ``pdserve.bench.structured_cases`` twice, interleaved:

- ``json``: greedy, each request constrained by its schema (to its natural end);
- ``free``: the same prompts unconstrained, each forced (``ignore_eos``) to exactly the
  number of tokens its constrained run produced, so both runs generate the same tokens.

Throughput = output tokens / wall time of the whole batch; the figure is the median over
repetitions of json / free. On a shared machine whole runs vary by 2x with the other load;
the figure that does not is the share of the json runs' wall time the engine spent on
structured output itself (filling and applying token masks, advancing matchers:
``GrammarBook.busy_s``), printed beside it with the ratio it implies (free time / (free
time + that work)). Grammars are compiled once (the first repetition warms the
cache; ``--reps`` counts the measured ones after it). Every constrained output is parsed
and validated with ``jsonschema``.

Run: ``python -m pdserve.bench.structured [--model tiny|smollm2|PATH] [--reps 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args(argv)

    import jsonschema

    from pdserve.bench.structured_cases import json_cases
    from pdserve.engine import LLM, SamplingParams
    from pdserve.engine.structured.spec import StructuredSpec

    llm = LLM(model=args.model, dtype="float32", device="cpu")
    cases = json_cases()
    tok = llm.tokenizer
    assert tok is not None
    if tok.has_chat_template:
        prompts: list[str | list[int]] = [
            tok.apply_chat_template([{"role": "user", "content": p}]) for _, p in cases]
    else:
        prompts = [p for _, p in cases]
    constrained = [SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                  structured=StructuredSpec.json_schema(s)) for s, _ in cases]

    def run(params: list[SamplingParams]) -> tuple[float, list]:
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        return time.perf_counter() - start, outs

    _, warm = run(constrained)  # compiles every grammar once
    free = [SamplingParams(max_tokens=len(o.token_ids), temperature=0.0, ignore_eos=True)
            for o in warm]
    ratios, json_tps, free_tps, shares = [], [], [], []
    book = llm.engine.grammars
    invalid = 0
    for rep in range(args.reps):
        busy = book.busy_s
        t_json, outs = run(constrained)
        shares.append((book.busy_s - busy) / t_json)
        t_free, free_outs = run(free)
        n_json = sum(len(o.token_ids) for o in outs)
        n_free = sum(len(o.token_ids) for o in free_outs)
        for (schema, _), out in zip(cases, outs, strict=True):
            try:
                jsonschema.validate(json.loads(out.text), schema)
            except (ValueError, jsonschema.ValidationError):
                invalid += 1
        json_tps.append(n_json / t_json)
        free_tps.append(n_free / t_free)
        ratios.append(json_tps[-1] / free_tps[-1])
        print(f"rep {rep}: json {json_tps[-1]:.1f} tok/s, free {free_tps[-1]:.1f} tok/s, "
              f"ratio {ratios[-1]:.2f}, structured-output work {100 * shares[-1]:.1f}% of the "
              "json run", flush=True)
    print(f"\nmodel {args.model}: {len(cases)} requests, {sum(len(o.token_ids) for o in warm)}"
          f" output tokens per run, {args.reps} reps")
    print("| run | output tok/s (median) |\n|---|---|")
    print(f"| free (same prompts and lengths) | {statistics.median(free_tps):.1f} |")
    print(f"| JSON schema | {statistics.median(json_tps):.1f} |")
    share = statistics.median(shares)
    print(f"\nratio json/free (median): {statistics.median(ratios):.2f}; structured-output "
          f"work: {100 * share:.1f}% of the json runs' time (median), implied ratio "
          f"{1 - share:.2f}; invalid outputs: {invalid} of {len(cases) * args.reps}")
    return 0 if invalid == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
