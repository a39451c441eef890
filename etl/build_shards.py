"""spark-submit entry point of the ETL (thin): see ``higr_dist.etl.build``.

    spark-submit etl/build_shards.py --interactions PATH --items PATH --output DIR \
        [--config <scale>/etl] [--format csv|parquet|kuairec|movielens] \
        [key=value ...]

e.g. MovieLens-100k as GroupLens publishes it::

    python etl/build_shards.py --format movielens --interactions ml-100k/u.data \
        --items ml-100k/u.item --output data/ml-100k

Also runnable as plain python (starts ``local[*]``, or ``--master``). On a cluster whose
executors lack our code and its dependencies, ship both (``make etl-env``)::

    spark-submit --master spark://master-host:7077 \
        --archives dist/etl-env.tar.gz#env --py-files dist/higr_dist.zip \
        --conf spark.pyspark.python=./env/bin/python \
        --conf spark.pyspark.driver.python=.venv/bin/python \
        --conf spark.checkpoint.dir=/shared/higr/checkpoints \
        etl/build_shards.py --interactions ... --items ... --output /shared/higr/etl

(README, "The ETL on a Spark cluster", for the GC options and YARN/Kubernetes.)
"""

import sys
from pathlib import Path

# run from a checkout without `pip install -e .`: make the package importable
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from higr_dist.etl.build import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
