"""Launcher for the recipe shipped in the package (``hf_optim/recipes/finetune_minilm.py``, also
``python -m hf_optim.recipes.finetune_minilm``), so ``hf-optim compare`` finds it from any directory.

    python recipes/finetune_minilm.py --output_dir out/finetune_minilm --optim adamw_8bit
"""

from hf_optim.recipes.finetune_minilm import main

if __name__ == "__main__":
    main()
