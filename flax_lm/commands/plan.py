"""`flax-lm plan`: will a run's train step fit in device memory? Asked of XLA, without running it.

    flax-lm plan --config configs/norwegian-gpt2.yaml --config_name DIR --tokenizer_name DIR \\
        --topology v3-8 [--json]

The training flags (or a recipe), then the plan of flax_lm.plan (the train step compiled ahead of
time, for the local devices or --topology) and, on a miss, what would fit.
Exit status: 0 fits, 1 does not fit, 2 bad input (one `error:` line).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flax_lm.errors import ArgParser, UserError, report_user_errors
from flax_lm.plan import (
    GPU_TARGETS,
    Plan,
    Target,
    choose_remat,
    gib,
    local_target,
    plan_step,
    suggest,
    topology_target,
)
from flax_lm.train.args import (
    SCRIPT_NAMES,
    TrainConfig,
    build_parser,
    check_values,
    parse_flags,
    resolve_defaults,
)

EXIT_DOES_NOT_FIT = 1


OBJECTIVE_OF_MODEL_TYPE = {"gpt2": "clm", "roberta": "mlm"}


def report(plan: Plan, target: Target) -> str:
    s, b = plan.settings, plan.per_device_bytes
    mesh = ", ".join(f"{k}={v}" for k, v in s["mesh"].items())
    lines = [
        f"train step on {target.description} (mesh {mesh})",
        f"  per-device batch {s['per_device_train_batch_size']} x {s['seq_len']} tokens, "
        f"accumulation {s['gradient_accumulation_steps']}, global batch "
        f"{s['global_batch_size']}, dtype {s['dtype']}, attention {s['attention']}, "
        f"remat {s['remat'] or 'none'}",
        "  per device:",
    ]
    rows = ["parameters", "optimizer_state", "batch", "temporaries", "program"]
    for name in rows:
        if name in b:
            lines.append(f"    {name.replace('_', ' '):<18}{gib(b[name]):>12}")
    if not plan.compiled:
        memory = "the device's memory" if target.memory_bytes is None else (
            f"{gib(target.memory_bytes)} {target.memory_kind}")
        lines.append(f"    {'total':<18}more than {memory} (held before temporaries "
                     f"{gib(b['total'])})")
    elif target.memory_bytes is None:
        lines.append(f"    {'total':<18}{gib(b['total']):>12}")
    else:
        spare = 1 - b["total"] / target.memory_bytes
        lines.append(
            f"    {'total':<18}{gib(b['total']):>12} of {gib(target.memory_bytes)} "
            f"{target.memory_kind} ({spare:.0%} spare)"
        )
    flops = plan.flops
    line = f"  FLOPs per step: model {flops['model']:.4g}, matmuls as built {flops['matmul']:.4g}"
    if "matmul_without_remat" in flops:
        extra = flops["matmul"] - flops["matmul_without_remat"]
        line += f" (remat recomputes {extra:.4g}: +{extra / flops['model']:.1%} of the model's)"
    lines.append(line)
    if plan.compiled:
        lines.append(f"  compiled in {plan.compile_seconds:.1f} s")
    else:
        lines.append("  XLA refused to compile it: it does not fit the device's memory")
    verdict = {True: "fits", False: "does not fit", None: "no verdict (memory unknown)"}
    lines.append(verdict[plan.fits])
    return "\n".join(lines)


def suggestion_text(suggestions: list[dict], target: Target) -> str:
    if not suggestions:
        return "nothing tried fits: a smaller model, sequence length or more devices"
    lines = ["what fits:"]
    for item in suggestions:
        flags = " ".join(f"--{k} {v}" for k, v in item["flags"].items())
        total = item["plan"].total
        lines.append(f"  {flags}: {gib(total)} per device of {gib(target.memory_bytes)}")
    return "\n".join(lines)


def as_json(plan: Plan, target: Target, suggestions: list[dict]) -> dict[str, Any]:
    return {
        "topology": target.name,
        "devices": len(target.devices),
        "device_kind": target.devices[0].device_kind,
        "fits": plan.fits,
        "hbm_bytes": target.memory_bytes,
        "memory_kind": target.memory_kind,
        "per_device_bytes": plan.per_device_bytes,
        "settings": plan.settings,
        "flops": plan.flops,
        "compile_seconds": plan.compile_seconds,
        "compiled": plan.compiled,
        "suggestions": [
            {"flags": item["flags"], "per_device_bytes": item["plan"].per_device_bytes}
            for item in suggestions
        ],
    }


def objective_of(argv: list[str]) -> str:
    """clm or mlm, from --model_type, the --config recipe's model_type, or the model config."""
    pre = ArgParser(add_help=False, allow_abbrev=False)
    for flag in ("--model_type", "--config", "--config_name", "--model_name_or_path"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    model_type = known.model_type or recipe_model_type(known.config)
    if model_type is None and (known.model_name_or_path or known.config_name):
        from flax_lm.config import load_base_config

        model_type = load_base_config(known.model_name_or_path or known.config_name).model_type
    if model_type is None and {"-h", "--help"} & set(argv):
        model_type = "gpt2"  # the flags are the same for both scripts but for a few
    if model_type not in OBJECTIVE_OF_MODEL_TYPE:
        raise UserError(
            f"--model_type must be gpt2 (planned as {SCRIPT_NAMES['clm']}) or roberta "
            f"({SCRIPT_NAMES['mlm']}), got {model_type!r}"
        )
    return OBJECTIVE_OF_MODEL_TYPE[model_type]


def recipe_model_type(path: str | None) -> str | None:
    """model_type of a --config YAML file (its errors are reported when the flags are parsed)."""
    if not path:
        return None
    import yaml

    try:
        with open(path, encoding="utf-8") as recipe:
            data = yaml.safe_load(recipe)
    except (OSError, yaml.YAMLError):
        return None
    return data.get("model_type") if isinstance(data, dict) else None


def parse_args(argv: list[str]) -> tuple[TrainConfig, str, argparse.Namespace]:
    objective = objective_of(argv)
    parser = build_parser(objective)
    parser.prog = "flax-lm plan"
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("--topology", help="devices to compile for: a TPU topology (v3-8, "
                        f"v5e:4x4, ...) or GPUs ({', '.join(GPU_TARGETS)}, e.g. h100:8) "
                        "(default: the local devices)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    values = vars(parse_flags(argv, objective, parser))
    options = argparse.Namespace(topology=values.pop("topology"), json=values.pop("json"))
    cfg = resolve_defaults(check_values(TrainConfig(**values), objective))
    return cfg, objective, options


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, objective, options = parse_args(argv)
    target = topology_target(options.topology) if options.topology else local_target()
    cfg, chosen = choose_remat(cfg, objective, target)
    if chosen:
        print(chosen, file=sys.stderr)
    plan = plan_step(cfg, objective, target)
    suggestions = []
    if plan.fits is False:
        suggestions = suggest(cfg, objective, target, plan)
    if options.json:
        print(json.dumps(as_json(plan, target, suggestions), indent=2))
    else:
        print(report(plan, target))
        if plan.fits is False:
            print(suggestion_text(suggestions, target))
    return EXIT_DOES_NOT_FIT if plan.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
