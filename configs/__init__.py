"""kivfm configs: `get_config(arg)` files, loaded by `--config=configs/<file>.py[:arg]`."""
