"""Launcher for the recipe shipped in the package (``hf_optim/recipes/train_clm.py``, also
``python -m hf_optim.recipes.train_clm``), so ``hf-optim compare`` finds it from any directory.

    python recipes/train_clm.py --output_dir out/train_clm --optim adamw_8bit
"""

from hf_optim.recipes.train_clm import main

if __name__ == "__main__":
    main()
