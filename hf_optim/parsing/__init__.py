"""Option values as users write them: ``values`` (booleans and numbers, often strings),
``sizes`` (``24GB``, ``80GiB``) and ``optim_args`` (the typed ``optim_args`` parser)."""
