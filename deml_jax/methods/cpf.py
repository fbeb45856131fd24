"""CPF, the Consistent Penalizing Field loss (Liu et al., ESWA 236, 2024), on our trunk.

related-methods.md §4, read from ``cloudlc/CPF`` (``criteria/cpf.py``): a proxy
loss with learned class proxies ``P [C, d]`` (Xavier-uniform) on the final
embedding; ``deml_jax.losses.cpf_loss`` computes it.  The paper's recipe is
ResNet-34 (frozen BatchNorm) with a 128-d embedding, which this package does
not have: here CPF runs on our GoogLeNet trunk with a single embedding layer
(:class:`deml_jax.models.embedding_net.EmbeddingNet`, ``pool5`` -> D with a
bias like the paper's ``last_linear``).  D = 512 by default, the size of the
U512 / ECAML / ABE-8 embeddings it is compared with;
``--config.model.embedding_dim=128`` gives the paper's size.

Proxies: ``params['proxies']`` ``[model.num_classes, D]``.  ``num_classes`` is
the training LABEL-ID space (labels are the datasets' original 0-based class
ids): CUB 100, Cars196 98, SOP 11,318; In-Shop's train items are interleaved
with the test items in 7,982 item ids, so its table has 7,982 rows of which
only the 3,997 train items are ever positives (the others only act as
negatives once their cosine exceeds tau).  A label outside the table makes the
loss NaN (the trainer then stops and names the step) and is counted in aux.

Proxy learning rate: ``loss.cpf_proxy_lr`` (absolute).  The released code
reads ``opt.loss_cpf_lr`` but never defines it (related-methods.md §4.4 item 2), so the value is
unknown; the default 5e-4 is the ArcFace proxy lr of the same framework.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from deml_jax import methods
from deml_jax.methods import ecaml
from deml_jax.models.embedding_net import EmbeddingNet

PROXY_RULE = r"(^|/)proxies$"

# related-methods.md §4.2 per-dataset tau, psi, s_p, s_n, mu, b: deml_jax.losses.cpf.cpf_defaults.
# In-Shop is not in the CPF code: it takes SOP's values (many classes with few
# images each) rather than the untuned code defaults; the digits demo CUB's.
PARAMS_OF = {"inshop": "sop", "digits": "cub200"}

# Training label-id space per dataset (see the module docstring).
NUM_CLASSES = {"cub200": 100, "cars196": 98, "sop": 11_318, "inshop": 7_982, "digits": 5}
# Images per training epoch and the released 100 epochs of batch 90 (len // 90 steps each).
TRAIN_IMAGES = {"cub200": 5_864, "cars196": 8_054, "sop": 59_551, "inshop": 25_882}


def build_model(config):
    m = config.model
    if m.dtype not in ecaml.DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(ecaml.DTYPES)}, "
                         f"got {m.dtype!r}")
    if not isinstance(m.num_classes, int) or m.num_classes < 1:
        raise ValueError(f"config.model.num_classes must be a positive int (the proxies' "
                         f"rows), got {m.num_classes!r}")
    return EmbeddingNet(embedding_dim=m.embedding_dim, backbone=m.backbone,
                        use_bias=True, num_proxies=m.num_classes, dtype=ecaml.DTYPES[m.dtype])


def _cpf_loss():
    from deml_jax import losses
    if hasattr(losses, "cpf_loss"):
        return losses.cpf_loss
    from deml_jax.losses.cpf import cpf_loss  # before losses/__init__ exports it
    return cpf_loss


def objective(outputs, labels, params, config, *, mask=None, key=None):
    """``cpf_loss(embeddings, labels, proxies)`` (related-methods.md §4.1); ``key`` is unused."""
    del key
    cfg = config.loss
    proxies = params["proxies"]
    loss, aux = _cpf_loss()(outputs["embeddings"], labels, proxies, tau=cfg.cpf_tau,
                            psi=cfg.cpf_psi, s_p=cfg.cpf_s_p, s_n=cfg.cpf_s_n, mu=cfg.cpf_mu,
                            b=cfg.cpf_b, mask=mask)
    bad = jnp.sum((labels < 0) | (labels >= proxies.shape[0]))
    loss = jnp.where(bad > 0, jnp.nan, loss)
    aux = {k: v for k, v in aux.items() if jnp.ndim(v) == 0}
    aux.update(cpf=loss, loss=loss, labels_outside_proxies=bad.astype(jnp.float32))
    return loss, aux


def optim_config(config):
    """``config.optim`` with the proxies' rule ``lr = loss.cpf_proxy_lr`` first."""
    optim = ml_collections.ConfigDict(config.optim.to_dict())
    proxy_lr, base_lr = config.loss.cpf_proxy_lr, optim.base_lr
    if not proxy_lr > 0 or not base_lr > 0:
        raise ValueError(f"config.loss.cpf_proxy_lr={proxy_lr!r} and config.optim.base_lr="
                         f"{base_lr!r} must both be > 0")
    optim.lr_mults = ((PROXY_RULE, float(proxy_lr) / float(base_lr)),) + tuple(
        tuple(r) for r in optim.lr_mults)
    return optim


# The released Roth et al. framework: network lr 5e-5, ``fc_lr`` 0.02 for the
# embedding layer (related-methods.md §4.2); biases of the trunk 2 as every Caffe-style row here.
LR_MULTS = (
    (r"(^|/)embed/", 0.02 / 5e-5),
    (r"bias$", 2.0),
)


def configure(c: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
    """Turns a base config into the CPF recipe of related-methods.md §4.2 for ``dataset`` on our trunk."""
    c.method = "cpf"
    c.model.update(num_branches=1, num_learners=1, embedding_dim=512,
                   channel_attention="none")
    c.model.num_classes = NUM_CLASSES[dataset]
    from deml_jax.losses.cpf import cpf_defaults
    params = cpf_defaults(PARAMS_OF.get(dataset, dataset))
    c.loss.update(diversity="none", act_weight=0.0, row_norm_lambda=0.0)
    c.loss.cpf_tau = params["tau"]
    c.loss.cpf_s_p = params["s_p"]
    c.loss.cpf_s_n = params["s_n"]
    c.loss.cpf_mu = params["mu"]
    c.loss.cpf_psi = params["psi"]
    c.loss.cpf_b = params["b"]
    c.loss.cpf_proxy_lr = 5e-4  # unknown in the released code (related-methods.md §4.4): ArcFace's analogue
    methods.set_batch(c, 45, 2, num_devices=1)  # batch 90 = 45 classes x 2 (related-methods.md §4.2)
    if dataset in TRAIN_IMAGES:  # 100 epochs of len // 90 batches
        epoch = TRAIN_IMAGES[dataset] // 90
        methods.set_run_length(c, 100 * epoch)
        if "snapshot_steps" in c.eval:  # the framework evaluates every epoch; we every 10
            c.eval.snapshot_steps = tuple(range(10 * epoch, 100 * epoch + 1, 10 * epoch))
        c.eval_every_steps = c.checkpoint_every_steps = 10 * epoch
    c.optim.update(base_lr=5e-5, schedule="constant", weight_decay=4e-4, lr_mults=LR_MULTS)
    return c


METHOD = methods.register(methods.Method(
    name="cpf", build_model=build_model, objective=objective,
    load_pretrained=ecaml.load_pretrained, batch_axes={"embeddings": 0},
    optim_config=optim_config,
    summary="CPF: proxy loss with a consistent penalizing field (ESWA 2024), GoogLeNet trunk"))
