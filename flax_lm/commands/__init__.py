"""The commands: `flax-lm` (cli.py) and its subcommands, `./run_clm_flax.py` and
`./run_mlm_flax.py` (train.py). Each parses its flags, calls the library and prints; what they
compute lives in the library modules beside this package."""
