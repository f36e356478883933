"""Parameter + optimizer-state bytes per device under --mesh layouts, for a full-size model.

Builds the training state (parameters, AdamW moments, step, RNG) exactly as the trainer does on
each mesh, then sums, device by device, the bytes of the arrays' shards that device holds
(`addressable_shards`). The replicated size (every device holding everything) is computed from
the shapes alone. On a machine with fewer devices it runs on that many host CPU devices.
It also compiles the trainer's initializer of a fresh model for each mesh and reports what XLA
says one device holds while it runs: the parameter shards it creates plus its temporaries.

    python bench/fsdp_memory.py --config gpt2 --devices 8 --mesh fsdp=8 --mesh data=2,fsdp=4
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="gpt2", help="a base config name or config.json")
    parser.add_argument("--devices", type=int, default=8, help="host CPU devices to lay out")
    parser.add_argument("--mesh", action="append", help="a --mesh layout (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import optax
    from flax import nnx

    from flax_lm.config import load_base_config
    from flax_lm.train.args import TrainConfig
    from flax_lm.train.build import fresh_params, model_shapes
    from flax_lm.train.optim import make_training_optimizer
    from flax_lm.train.prepare import Prepared
    from flax_lm.train.step import init_state, make_mesh

    config = load_base_config(args.config)
    run = Prepared(cfg=TrainConfig(), objective=None, model_config=config, tokenizer=None,
                   splits={}, seq_len=0, num_devices=jax.device_count(), train_batches=None,
                   total_steps=0, resume=None)  # only the model is built from it
    graphdef, params = nnx.split(model_shapes(run, make_mesh()), nnx.Param)
    params = fresh_params(run, make_mesh(), params)()
    optimizer = make_training_optimizer(
        TrainConfig(weight_decay=0.01), optax.constant_schedule(1e-4), params
    )
    shapes = jax.eval_shape(lambda p: init_state(p, optimizer, 0, make_mesh()), params)
    replicated = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    print(f"{args.config}: {count:,} parameters; parameters + AdamW state replicated: "
          f"{replicated / 2**20:,.1f} MiB on every device ({jax.device_count()} devices)")
    whole = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))
    print("| mesh | MiB per device (most loaded) | x (replicated / fsdp size) | creating the "
          "parameters: MiB per device (shards + temporaries) | x (one whole copy) |")
    print("|---|---:|---:|---:|---:|")
    for spec in args.mesh or ["fsdp=-1"]:
        mesh = make_mesh(spec=spec)
        shapes = nnx.split(model_shapes(run, mesh), nnx.Param)[1]
        made = fresh_params(run, mesh, shapes).lower().compile().memory_analysis()
        creating = made.output_size_in_bytes + made.temp_size_in_bytes
        state = init_state(params, optimizer, 0, make_mesh(spec=spec))
        held: dict[int, int] = {}
        for leaf in jax.tree.leaves(state):
            for shard in leaf.addressable_shards:
                held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
        most = max(held.values())
        ideal = replicated / (make_mesh(spec=spec).shape["fsdp"])
        print(f"| {spec} | {most / 2**20:,.2f} | {most / ideal:.4f} | {creating / 2**20:,.1f} "
              f"| {creating / whole:.3f} |")
        del state
    sys.stdout.flush()


if __name__ == "__main__":
    main()
