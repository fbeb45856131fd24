"""Command line: ``python -m deml_jax.main --config CONFIG[:ARGS] --workdir DIR``.

Overrides use absl/ml_collections syntax, e.g. ``--config.total_steps=3``; an
unknown key is an error that names it.  Multi-host runs (TPU pods, GPU
clusters) call ``jax.distributed.initialize()`` first: automatic on TPU pods
and under SLURM/Open MPI; pass ``--coordinator host:port --num_processes N
--process_id I`` elsewhere.

Config arguments (``--config configs/demo_digits.py:googlenet``) are listed on
the ``Args:`` line of each config file's docstring; ``--config FILE --help``
prints it.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cub200_deml.py:runlocal",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host, optional).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, optional).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host, optional).")
flags.DEFINE_list("allow_config_change", [], "On resume: config keys (or group.*) allowed "
                  "to differ from the workdir's config.json (model-shape keys never are).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:  # library INFO chatter (orbax, tfds) off by default
        logging.set_verbosity(logging.WARNING)
    import jax

    if FLAGS.distributed or FLAGS.coordinator:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    from deml_jax import train
    from deml_jax.evaluate import cli_errors

    with cli_errors("train"):  # a held lock, a refused config change: one line, exit 1
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                 allow_config_change=FLAGS.allow_config_change)


def run():
    """Console script ``deml-train`` (pyproject.toml) = ``python -m deml_jax.main``."""
    from deml_jax import config_lib

    config_lib.run_absl_cli(main, __doc__)


if __name__ == "__main__":
    run()
