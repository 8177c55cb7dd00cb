"""Config files of the mot package: `get_config(arg)` returning an ml_collections.ConfigDict."""
