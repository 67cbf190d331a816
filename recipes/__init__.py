"""Recipes: LightningCLI entry points, LightningModules and DataModules built on lightning-localsgd.

* :mod:`recipes.image_classification` — fine-tune a timm network (``ImageClassifier``).
* :mod:`recipes.data` — image data modules that partition the data across ranks themselves
  (iid, Dirichlet label skew, k classes per rank); :mod:`recipes.partition` holds the math.
* :mod:`recipes.cli` — ``lightning-localsgd fit --config ...`` (LightningCLI).
* :mod:`recipes.journal` — ``RunJournal``: accuracy vs wall-clock, bytes and syncs as JSON.
* :mod:`recipes.demo` — ``make demo``: pretrain, then DDP vs local SGD vs DiLoCo on 2 processes.
* :mod:`recipes.linear`, :mod:`recipes.char_lm` — linear models for the seed-000 theory and a
  char-level LM on the standard library's source (``python -m recipes.<name> fit --config ...``).

Configs live in ``configs/<recipe>/``: a ``base.yaml`` plus one small overlay per algorithm.

The wheel installs this folder as ``lightning_localsgd_recipes`` (the ``lightning-localsgd`` script is
``lightning_localsgd_recipes.cli:main``); in a checkout it runs as ``recipes``. The modules import each
other relatively so that they work under either name.
"""
