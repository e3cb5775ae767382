"""The config is strict: a bad file fails at once with a message naming the problem."""

import pytest

from pipelines.core.config import ConfigError, config_from_dict, load_config


def test_demo_config_loads_with_every_section():
    cfg = load_config("configs/demo.yaml")
    assert cfg.cluster.num_fine == 64 and cfg.cluster.num_experts == 4
    assert cfg.train.model.endswith("moda-tiny.json")


def test_unknown_key_is_named_with_its_section():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['num_expert'\] in section 'cluster'"):
        config_from_dict({"cluster": {"num_expert": 4}})


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="clusters"):
        config_from_dict({"clusters": {}})


def test_fewer_fine_clusters_than_experts_is_rejected():
    with pytest.raises(ConfigError, match="num_fine .* must be >= cluster.num_experts"):
        config_from_dict({"cluster": {"num_fine": 2, "num_experts": 4}})


def test_wrong_type_is_rejected_not_cast():
    with pytest.raises(ConfigError, match="cluster.num_fine must be int"):
        config_from_dict({"cluster": {"num_fine": "64"}})


def test_int_is_accepted_where_float_is_expected():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_unknown_routing_variant_is_rejected():
    with pytest.raises(ConfigError, match="evaluate.routing"):
        config_from_dict({"evaluate": {"routing": "oracle"}})


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
