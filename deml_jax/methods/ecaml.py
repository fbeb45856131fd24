"""ECAML, Energy Confused Adversarial Metric Learning (Chen & Deng, AAAI 2019).

related-methods.md §2, read from ``chenbinghui1/ECAML`` (Cars196 recipe only):

* model (related-methods.md §2.1): one GoogLeNet, ``pool5`` -> ``fc_embedding`` 1024 -> 512 with
  bias (lr_mult 10 / 20, Xavier), unnormalised embedding; the confusion
  branch ``fc_embedding_a`` shares W, b on ``stop_gradient(pool5)``
  (:class:`deml_jax.models.embedding_net.EmbeddingNet` with ``confusion=True``);
* objective (related-methods.md §2.2-§2.5)::

      L = L_metric(z) + ec_weight * log E(z_a) + R(W)      (confusion='ecaml')
      L = L_metric(z)                                        (confusion='none')

  ``L_metric`` = binomial deviance (``BIERLoss``, C_n 25: the released
  prototxt), contrastive or triplet (``config.loss.metric``); ``E`` the
  pair-count-normalised half squared distances over R = 10 sampled
  different-class partners per anchor (or all negative pairs); ``R(W) =
  (lambda / N_out) sum_r (||W_r||^2 - 1)^2`` with lambda 0.5 (related-methods.md §2.3, the
  ``bier_init`` regulariser of the confusion layer, hence only with it).

Who gets what (related-methods.md §2.4): the trunk only the metric loss (stop-gradient), W the
metric loss + EC + R(W), b the metric loss only (b cancels in E; stopped in
the model so its EC gradient is exactly zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from deml_jax import methods
from deml_jax.losses.binomial import binomial_deviance
from deml_jax.losses.regularizers import row_norm_penalty
from deml_jax.methods import deml
from deml_jax.models.embedding_net import EmbeddingNet

METRICS = ("binomial", "contrastive", "triplet")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config):
    m = config.model
    if m.dtype not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}")
    return EmbeddingNet(embedding_dim=m.embedding_dim, backbone=m.backbone, use_bias=True,
                        confusion=deml.check_confusion(config.loss) == "ecaml",
                        dtype=DTYPES[m.dtype])


def metric_loss(z, labels, cfg, *, key=None, mask=None):
    """The base metric loss ``config.loss.metric`` on embeddings ``[B, D]`` (related-methods.md §2.5)."""
    kind = cfg.get("metric", "binomial")
    if kind == "binomial":
        loss, aux = binomial_deviance(z, labels, alpha=cfg.alpha, beta=cfg.beta,
                                      cost_pos=cfg.cost_pos, cost_neg=cfg.cost_neg,
                                      shrinkage=cfg.shrinkage, mask=mask)
        return loss, {k: aux[k] for k in ("binomial_display", "mean_pos_cos", "mean_neg_cos")}
    if kind == "contrastive":
        from deml_jax.losses.contrastive import contrastive_loss
        return contrastive_loss(z, labels, margin=cfg.contrastive_margin, mask=mask)
    if kind == "triplet":
        from deml_jax.losses.triplet import triplet_loss
        if cfg.triplet_negatives == "random" and key is None:
            raise ValueError("config.loss.triplet_negatives='random' needs a PRNG key")
        return triplet_loss(z, labels, margin=cfg.triplet_margin,
                            negatives=cfg.triplet_negatives, key=key, mask=mask)
    raise ValueError(f"config.loss.metric must be one of {METRICS}, got {kind!r}")


def objective(outputs, labels, params, config, *, mask=None, key=None):
    """ECAML's total loss (module docstring); aux holds each part."""
    cfg = config.loss
    k_metric, k_ec = (None, None) if key is None else tuple(jax.random.split(key))
    metric, metric_aux = metric_loss(outputs["embeddings"], labels, cfg, key=k_metric, mask=mask)
    parts = {"metric": metric}
    aux = {k: v for k, v in metric_aux.items() if jnp.ndim(v) == 0}
    if deml.check_confusion(cfg) == "ecaml":
        parts["confusion"], ec_aux = deml.confusion_term(outputs["confusion"], labels, cfg,
                                                         key=k_ec, mask=mask)
        aux["ec_energy"] = ec_aux["ec_energy"]
        if cfg.row_norm_lambda:
            parts["row_norm"] = row_norm_penalty(params["embed"]["kernel"],
                                                 lam=cfg.row_norm_lambda)
    loss = sum(parts.values())
    aux.update(parts)
    aux["loss"] = loss
    return loss, aux


def load_pretrained(params, batch_stats, converted):
    """The ImageNet trunk goes into ``trunk``; ``embed`` keeps its Xavier init."""
    from deml_jax.models import weights
    params = weights.replicate_into_branches({"branch_0": params}, converted["params"])["branch_0"]
    if "batch_stats" in converted:
        batch_stats = weights.replicate_into_branches(
            {"branch_0": batch_stats}, converted["batch_stats"])["branch_0"]
    return params, batch_stats


# fc_embedding: W lr_mult 10, b lr_mult 20 (related-methods.md §2.1); the trunk keeps 1 / 2.
LR_MULTS = (
    (r"(^|/)embed/kernel$", 10.0),
    (r"(^|/)embed/bias$", 20.0),
    (r"bias$", 2.0),
)


def configure(c: ml_collections.ConfigDict, dataset: str = "cars196") -> ml_collections.ConfigDict:
    """Turns a base config (configs/common.py) into the released ECAML recipe (related-methods.md §2.6).

    Only the Cars196 recipe is released; every ``dataset`` gets it unchanged.
    """
    del dataset
    c.method = "ecaml"
    c.model.update(num_branches=1, num_learners=1, embedding_dim=512,
                   channel_attention="none")
    c.loss.update(diversity="none", act_weight=0.0, cost_neg=25.0,  # BIERLoss C_n 25 (related-methods.md §2.5)
                  confusion="ecaml", ec_weight=0.13, ec_pairs="random", ec_partners=10,
                  row_norm_lambda=0.5)  # related-methods.md §2.3 lamda 0.5
    c.loss.metric = "binomial"  # the released prototxt's base loss (related-methods.md §2.5)
    c.loss.contrastive_margin = 0.5  # ours: no ECAML contrastive recipe
    c.loss.triplet_margin = 0.1  # RankHardLoss m (related-methods.md §2.5)
    c.loss.triplet_negatives = "hard"
    methods.set_batch(c, 65, 2, num_devices=1)  # 130 = 65 x 2, one GPU (related-methods.md §2.6)
    methods.set_run_length(c, 10_000)  # related-methods.md §2.6 max_iter
    c.optim.update(base_lr=1e-5, schedule="step", step_size=10_000, gamma=0.8,
                   weight_decay=2e-4, lr_mults=LR_MULTS)
    c.eval_every_steps = 1_000  # snapshots every 1000 (related-methods.md §2.6)
    c.checkpoint_every_steps = 1_000
    if "snapshot_steps" in c.eval:  # the released evaluator loops over snapshots 1000..10000
        c.eval.snapshot_steps = tuple(range(1_000, 10_001, 1_000))
    return c


METHOD = methods.register(methods.Method(
    name="ecaml", build_model=build_model, objective=objective,
    load_pretrained=load_pretrained, batch_axes={"embeddings": 0, "confusion": 0},
    summary="ECAML: metric loss + energy confusion on a stop-gradient copy of the FC (AAAI 2019)"))
