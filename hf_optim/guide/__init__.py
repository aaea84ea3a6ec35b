"""Choosing an optimizer: the ``hf-optim`` command line and the tools behind it.

``recommend`` (the decision flow), ``memory`` (the exact memory model),
``translate`` (hyperparameters from one rule to another), ``compare`` (one
recipe under several optimizers), ``bench`` (a step-time table) and ``cli``.

Nothing is re-exported here: ``recommend`` is both a module and its function,
and the public functions are reached as ``hf_optim.recommend``,
``hf_optim.memory_table``, ``hf_optim.translate_hparams``.
"""
