"""model.object_attention=False (ablation): every branch sees the whole image."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from deml_jax.models.deml import DeML, build_model


def test_without_object_attention_branch_sees_whole_image():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3)) * 50.0
    off = DeML(2, 1, 8, backbone="tiny", channel_attention="none", object_attention=False)
    variables = off.init(jax.random.PRNGKey(0), x)
    out = off.apply(variables, x)
    assert "boxes" not in out and "crops" not in out and "attention" not in out
    # Reference: branch 1's parameters in a one-branch network (no walk at all) on x.
    single = DeML(1, 1, 8, backbone="tiny", channel_attention="none")
    ref_vars = {k: {"branch_0": v["branch_1"]} for k, v in variables.items()}
    ref = single.apply(ref_vars, x)
    np.testing.assert_allclose(out["embeddings"][1], ref["embeddings"][0], rtol=1e-5, atol=1e-5)
    # With the walk (the method), branch 1 sees the crops: a different embedding.
    on = DeML(2, 1, 8, backbone="tiny", channel_attention="none")
    with_walk = on.apply(variables, x)
    assert "boxes" in with_walk
    assert not np.allclose(with_walk["embeddings"][1], ref["embeddings"][0], atol=1e-3)


def test_config_flag_reaches_model():
    c = common.get_base_config()
    assert c.model.object_attention is True
    c.model.update(backbone="tiny", object_attention=False)
    assert build_model(c.model).object_attention is False
    assert build_model(common.get_base_config().model).object_attention is True
