import pytest

from raypdm.config import ConfigError, config_hash, parse_overrides, resolve_config, save_resolved_config
from raypdm.demo import DemoConfig
from raypdm.pipelines.purify import PurifyConfig


def test_unknown_key_names_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: /a\noutput: /b\nbatch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"batch_sise: unknown field"):
        resolve_config(PurifyConfig, path=str(path))


def test_wrong_type_and_value_name_the_field():
    with pytest.raises(ConfigError, match=r"batch_size: .*integer"):
        resolve_config(PurifyConfig, flags={"input": "a", "output": "b"}, overrides=["batch_size=many"])
    with pytest.raises(ConfigError, match=r"workers: .*greater than or equal to 1"):
        resolve_config(PurifyConfig, flags={"input": "a", "output": "b", "workers": 0})
    with pytest.raises(ConfigError, match=r"input: Field required"):
        resolve_config(PurifyConfig, flags={"output": "b"})


def test_purifier_options_are_validated_before_work():
    with pytest.raises(ConfigError, match="quality"):
        resolve_config(PurifyConfig, flags={"input": "a", "output": "b"}, overrides=["options.jpeg.quality=500"])
    with pytest.raises(ConfigError, match="unknown purifier"):
        resolve_config(PurifyConfig, flags={"input": "a", "output": "b", "purifier": "jpgg"})
    with pytest.raises(ConfigError, match="not in the chain"):
        resolve_config(PurifyConfig, flags={"input": "a", "output": "b"}, overrides=["options.gaussian.kernel_size=3"])


def test_unsafe_identity_is_rejected():
    with pytest.raises(ConfigError, match="identities.*separator"):
        resolve_config(PurifyConfig, flags={"input": "a", "output": "b", "identities": ["../etc"]})


def test_precedence_yaml_then_flags_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("input: /a\noutput: /b\nbatch_size: 4\nworkers: 3\n")
    cfg = resolve_config(PurifyConfig, path=str(path), flags={"batch_size": 16, "workers": None},
                         overrides=["options.jpeg.quality=90"])
    assert (cfg.batch_size, cfg.workers, cfg.options) == (16, 3, {"jpeg": {"quality": 90}})


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1", "c=[x, y]", "d=true", "e="]) == {"a": {"b": 1}, "c": ["x", "y"], "d": True, "e": ""}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["novalue"])


def test_missing_and_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(DemoConfig, path=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(DemoConfig, path=str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        resolve_config(DemoConfig, path=str(listy))


def test_config_hash_is_stable_and_sensitive():
    a = config_hash({"x": 1, "y": [1, 2]})
    assert a == config_hash({"y": [1, 2], "x": 1})
    assert a != config_hash({"x": 2, "y": [1, 2]})


def test_resolved_config_is_saved(tmp_path):
    cfg = resolve_config(DemoConfig, flags={"output": str(tmp_path)})
    target = save_resolved_config(cfg, str(tmp_path))
    again = resolve_config(DemoConfig, path=target)
    assert again == cfg
