"""``python -m deml_jax.evaluate --config CONFIG --workdir DIR [--checkpoint best]``.

Evaluates a trained checkpoint on the test split(s): every configured metric
(Recall@K, P@1, R-precision, MAP@R, NMI, F1) printed as a table and written to
``DIR/eval_<checkpoint>_<step>.json``, plus pictures in ``DIR/pictures/``: a
retrieval grid and one attention figure per image (the image with its
object-attention box, the random-walk map, the zoomed inputs of branches 2..I).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags



def evaluate_checkpoint(config, workdir: str, which: str = "latest", num_pictures: int = 8,
                        *, allow_config_change=()):
    """Returns the test metrics of ``workdir``'s checkpoint; writes JSON and PNGs.

    Only reads the checkpoints (no lock: runs beside a training run); refuses a
    config whose model or data differ from the workdir's ``config.json`` unless
    the keys are in ``allow_config_change``.
    """
    from deml_jax import data_glue, json_util, logging_lib, train

    state, model, devices, embed = train.trained_embedder(
        config, workdir, which, allow_config_change=allow_config_change)
    variables = train.variables_of(state)
    evaluator = data_glue.make_evaluator(config, embed, "test", len(devices))
    results = evaluator.run()
    step = int(state["step"])
    if jax.process_index() == 0:
        path = os.path.join(workdir, f"eval_{which}_{step}.json")
        json_util.dump({"step": step, "checkpoint": which, "test": results}, path)
        print(logging_lib.format_table(results, title=f"test @ step {step} ({which})"))
        if num_pictures:
            pictures(config, model, variables, evaluator, os.path.join(workdir, "pictures"),
                     num_pictures)
    return results


def pictures(config, model, variables, evaluator, out_dir: str, count: int) -> list[str]:
    """A retrieval grid of ``count`` queries and their attention figures."""
    from deml_jax import data_glue, visualize
    from deml_jax.data import pipeline
    from deml_jax.evaluation.knn import knn_search

    os.makedirs(out_dir, exist_ok=True)
    roles = data_glue.split_names(config, "test")
    q_role = "query" if "query" in roles else "test"
    g_role = "gallery" if "gallery" in roles else "test"
    q, g = evaluator.last[q_role], evaluator.last[g_role]
    rng = np.random.default_rng(config.seed)
    picks = np.sort(rng.choice(len(q["labels"]), min(count, len(q["labels"])), replace=False))
    k = min(8, len(g["labels"]) - 1)
    self_mode = q_role == g_role
    nn = knn_search(q["embeddings"][picks], g["embeddings"], k=k + self_mode,
                    metric=config.eval.metric)["indices"]
    if self_mode:  # the picked queries are in the gallery: drop each one's own entry
        nn = np.array([[j for j in row if j != p][:k] for p, row in zip(picks, nn)])
    sources = {r: data_glue.load_source(config, roles[r]) for r in {q_role, g_role}}
    transform = data_glue.eval_transform(config)
    load = lambda role, idx: np.stack([transform(pipeline.decode_bgr(sources[role][int(i)]))
                                       for i in idx])
    q_images = load(q_role, q["indices"][picks])
    # Decode only the shown neighbours (a whole SOP gallery would not fit in memory).
    shown = np.unique(nn[nn >= 0])
    g_images = load(g_role, g["indices"][shown])
    nn = np.where(nn >= 0, np.searchsorted(shown, nn), -1)
    mean = config.dataset.mean_bgr
    paths = [visualize.retrieval_grid(q_images, g_images, nn, q["labels"][picks],
                                      g["labels"][shown],
                                      os.path.join(out_dir, "retrieval_grid.png"), k=k,
                                      mean_bgr=mean)]
    out = jax.jit(lambda v, x: model.apply(v, x))(variables, q_images)
    if "attention" in out:
        for n in range(len(picks)):
            paths.append(visualize.attention_figure(
                q_images[n], np.asarray(out["attention"][0, n]), np.asarray(out["boxes"][0, n]),
                [np.asarray(c) for c in out["crops"][:, n]],
                os.path.join(out_dir, f"attention_{n:02d}.png"), mean_bgr=mean))
    return paths


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    if not FLAGS["verbosity"].present:  # library INFO chatter (orbax, tfds) off by default
        logging.set_verbosity(logging.WARNING)
    with cli_errors("evaluate"):
        evaluate_checkpoint(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint, FLAGS.num_pictures,
                            allow_config_change=FLAGS.allow_config_change)


@contextlib.contextmanager
def cli_errors(command: str):
    """Expected failures (missing workdir, unreadable checkpoints, a refused
    config change, a held lock) end the program with one line, no traceback."""
    from deml_jax import checkpoint, workdir
    from deml_jax.evaluation.metrics import DegenerateEvaluationError

    try:
        yield
    except (FileNotFoundError, checkpoint.CheckpointUnreadableError,
            checkpoint.CheckpointMismatchError, checkpoint.CheckpointWriteError,
            workdir.ConfigChangeError, workdir.WorkdirLockedError,
            DegenerateEvaluationError) as err:
        sys.exit(f"{command}: error: {err}")


def _define_flags():
    """CLI flags, defined only when run as a program (the module stays importable)."""
    config_flags.DEFINE_config_file("config", None, "The training config file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "The training workdir (holds checkpoints/).")
    flags.DEFINE_enum("checkpoint", "latest", ["latest", "best"], "Which checkpoint to evaluate.")
    flags.DEFINE_integer("num_pictures", 8, "Queries in the grid and attention figures (0 = none).")
    flags.DEFINE_list("allow_config_change", [], "Config keys (or group.*) allowed to differ "
                      "from the workdir's config.json.")
    flags.mark_flags_as_required(["config", "workdir"])


def run():
    """Console script ``deml-evaluate`` (pyproject.toml) = ``python -m deml_jax.evaluate``."""
    from deml_jax import config_lib

    _define_flags()
    config_lib.run_absl_cli(main, __doc__)


if __name__ == "__main__":
    run()
