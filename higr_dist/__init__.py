"""higr-dist: distributed training for HiGR, a generative slate recommender.

Layout (the architecture, top-down):

- ``etl/``        PySpark jobs: sources -> validation/quarantine -> sequences -> WebDataset shards
- ``schema/``     one module per sample kind, shared by the Spark writer and the loader
- ``data/``       streaming WebDataset loader (rank/worker split, shuffle, resume, SID mapping)
- ``models/``     pure single-device ``nn.Module`` s (no deepspeed/trainer/data imports)
- ``stages/``     one small spec per stage: model + batch + loss (tokenizer, hsd, orpo/dpo)
- ``engine/``     the one DeepSpeed trainer (``deepspeed.initialize`` lives here only)
- ``tokenizer/``  SID export, collision resolution, prefix trie, SID quality metrics
- ``decode/``     coarse-to-fine decoding (HiGR) and flat beam search, trie-constrained
- ``eval/``       offline metrics and evaluation harness
- ``pipeline.py`` ``higr run``: ETL -> tokenizer -> HSD -> ORPO -> eval -> slates
- ``launch.py``   what the launchers start on every rank (``-m higr_dist.launch``)
- ``layout.py``   the one module that knows the run folder's layout
- ``configs/``    the shipped configs (package data), named ``tiny``, ``tiny/hsd`` ...
"""

__version__ = "0.1.0"
