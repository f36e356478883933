"""Training engine shared by run_clm_flax.py and run_mlm_flax.py: config, data, objectives,
optimizer, compiled data-parallel steps, checkpoints, metrics and the loop."""
