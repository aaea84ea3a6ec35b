"""Training recipes shipped with hf_optim: ``python -m hf_optim.recipes.train_clm`` (what ``hf-optim compare``
runs by default) and ``python -m hf_optim.recipes.finetune_minilm``; ``recipes/*.py`` in the repository launch them."""
