"""``python -m deml_jax.export_features --config CONFIG --workdir DIR --split test --out F.npz``.

Writes the inference embeddings (the concatenated L2-normalised learner
embeddings, §3.6) of a split with labels, ids and file names, in the npz
format of :mod:`deml_jax.evaluation.features`; evaluate them later with
``python -m deml_jax.evaluation.features --features F.npz``.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags



def export(config, workdir: str, split: str, out: str, which: str = "latest", *,
           allow_config_change=()) -> str:
    """Embeds ``split`` with ``workdir``'s checkpoint into ``out``; only reads the workdir."""
    import jax

    from deml_jax import data_glue, train
    from deml_jax.data import pipeline
    from deml_jax.evaluation.evaluator import embed_split
    from deml_jax.evaluation.features import save_features

    state, _, devices, embed = train.trained_embedder(
        config, workdir, which, allow_config_change=allow_config_change)
    source = data_glue.load_source(config, split)
    batches = pipeline.eval_batches(
        source, batch_size_per_device=config.eval.batch_size_per_device,
        num_local_devices=len(devices), process_index=jax.process_index(),
        process_count=jax.process_count(), transform=data_glue.eval_transform(config))
    result = embed_split(embed, batches, split=split)
    names = data_glue.file_names(config, split)[result["indices"]]
    meta = {"dataset": data_glue.dataset_name(config), "split": split, "checkpoint": which,
            "step": int(state["step"]), "config": config.to_json()}
    if jax.process_index() == 0:
        save_features(out, result["embeddings"], result["labels"], ids=result["indices"],
                      filenames=names, metadata=meta)
    return out


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:  # library INFO chatter (orbax, tfds) off by default
        logging.set_verbosity(logging.WARNING)
    from deml_jax.evaluate import cli_errors

    with cli_errors("export_features"):
        print(export(FLAGS.config, FLAGS.workdir, FLAGS.split, FLAGS.out, FLAGS.checkpoint,
                     allow_config_change=FLAGS.allow_config_change))


def _define_flags():
    """CLI flags, defined only when run as a program (the module stays importable)."""
    config_flags.DEFINE_config_file("config", None, "The training config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The training workdir (holds checkpoints/).")
    flags.DEFINE_string("split", "test", "Dataset split to embed (e.g. test, val, query, gallery).")
    flags.DEFINE_string("out", None, "Output .npz path.")
    flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "Which checkpoint to use.")
    flags.DEFINE_list("allow_config_change", [], "Config keys (or group.*) allowed to differ "
                      "from the workdir's config.json.")
    flags.mark_flags_as_required(["config", "workdir", "out"])


def run():
    """Console script ``deml-export`` (pyproject.toml) = ``python -m deml_jax.export_features``."""
    from deml_jax import config_lib

    _define_flags()
    config_lib.run_absl_cli(main, __doc__)


if __name__ == "__main__":
    run()
