"""The method layer (deml_jax/methods/): registry, config choices, no name tests in the trainer."""

import os
import re

import pytest

from deml_jax import config_lib, methods

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_registered_method_is_complete():
    for name in methods.names():
        m = methods.get_method(name)
        assert m.name == name
        assert callable(m.build_model) and callable(m.objective) and callable(m.load_pretrained)
        assert m.batch_axes and all(isinstance(a, int) for a in m.batch_axes.values())
    assert set(methods.names()) == {"abe", "cpf", "deml", "ecaml", "u512"}


def test_validation_takes_the_method_names_from_the_registry():
    """A method module is found by its file name: no list to extend elsewhere."""
    from configs import common

    assert "method" not in config_lib.CHOICES
    c = common.get_base_config()
    c.method = "arcface"
    with pytest.raises(ValueError, match=r"config.method='arcface' is not one of"):
        config_lib.validate(c)
    assert config_lib.CHOICES["loss.confusion"] == ("none", "ecaml")


def test_unknown_method_names_the_key():
    with pytest.raises(ValueError, match=r"config.method='arcface' is not one of"):
        methods.get_method("arcface")


def test_a_duplicate_registration_is_refused():
    m = methods.get_method("ecaml")
    with pytest.raises(ValueError, match="registered twice"):
        methods.register(methods.Method(name="ecaml", build_model=m.build_model,
                                        objective=m.objective,
                                        load_pretrained=m.load_pretrained, batch_axes={}))


def test_the_trainer_never_tests_a_method_name():
    """Adding a method must not touch train.py: it only calls get_method."""
    with open(os.path.join(ROOT, "deml_jax", "train.py")) as f:
        source = f.read()
    assert "get_method(config.method)" in source
    assert not re.search(r"method\s*(==|!=|in)\s*[\"'(]", source)
    for name in ("deml_loss", "EmbeddingNet", "cpf", "ecaml"):
        assert name not in source, name


def test_every_method_config_file_loads_validates_and_builds():
    from deml_jax import train
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                   if re.search(r"_(ecaml|cpf|abe8)\.py$", f))
    assert len(names) == 15  # 4 benchmarks + the digits demo, x 3 methods
    for name in names:
        for arg in ("", ":runlocal"):
            c = config_lib.load_config(os.path.join(ROOT, "configs", name) + arg)
            config_lib.validate(c)
            assert c.method == {"ecaml": "ecaml", "cpf": "cpf", "abe8": "abe"}[
                name.rsplit("_", 1)[1][:-3]]
            train.create_model(c)
            train.create_optimizer(c)
