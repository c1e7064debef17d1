"""The plugin manager: built-ins, third-party entry points, env vars, failures."""

import sys

import pytest

from t2vu.core import plugins
from t2vu.core.plugins import PluginManager
from t2vu.core.registry import KINDS, Component, Registry, RegistryError

from helpers import make_dist


def test_builtins_register_through_hooks():
    reg = plugins.get_registry()
    assert {"cogvideox"} <= set(reg.names("backbone"))
    assert "adapter" in reg.names("eraser")
    assert {"negative_guidance", "preservation", "localization"} <= set(reg.names("loss"))
    assert {"file", "list"} <= set(reg.names("concept_source"))
    comp = reg.get("loss", "negative_guidance")
    assert comp.plugin == "t2vu.losses.negative_guidance" and comp.distribution == "t2vu"
    # built-ins are ordinary pluggy plugins
    pm = plugins.get_plugin_manager().pm
    assert pm.has_plugin("t2vu.backbones.cogvideox")


def test_the_toy_world_is_a_third_party_distribution():
    """The toy world registers through the entry point of its own distribution, not as a built-in."""
    reg = plugins.get_registry()
    comp = reg.get("backbone", "toy")
    assert comp.distribution == "t2vu-toy" and comp.plugin == "toy"
    assert "t2vu_toy.plugin" not in plugins.BUILTIN_PLUGINS
    assert not any(name.startswith("t2vu.toy") for name in plugins.BUILTIN_PLUGINS)


def test_third_party_plugin_registers_every_kind():
    reg = plugins.get_registry()
    expected = {"backbone": "example_backbone", "eraser": "example_eraser", "loss": "example_l1",
                "concept_source": "example_colours", "augmenter": "example_repeat",
                "evaluator": "example_judge", "prompt_set": "example_prompts"}
    assert set(expected) == set(KINDS)
    for kind, name in expected.items():
        comp = reg.get(kind, name)
        assert comp.plugin == "example"
        assert comp.distribution == "t2vu-example" and comp.version == "0.3.1"


def test_implementation_is_imported_only_when_built():
    sys.modules.pop("t2vu_example.heavy", None)  # other tests may have built it
    reg = PluginManager().registry
    comp = reg.get("evaluator", "example_judge")
    assert "t2vu_example.heavy" not in sys.modules
    import torch

    judge = comp.build({"threshold": 0.25})
    assert judge(torch.full((2, 3, 4, 4), 0.3)) == "bright" and judge(torch.zeros(2, 3, 4, 4)) == "dark"
    assert "t2vu_example.heavy" in sys.modules


def test_load_plugins_env_selects_distributions(monkeypatch):
    monkeypatch.setenv("T2VU_LOAD_PLUGINS", "")
    reg = PluginManager().registry
    assert "example_backbone" not in reg.names("backbone")
    assert "cogvideox" in reg.names("backbone")  # built-ins always load
    monkeypatch.setenv("T2VU_LOAD_PLUGINS", "t2vu-example")
    assert "example_backbone" in PluginManager().registry.names("backbone")


def test_disable_plugins_env(monkeypatch):
    monkeypatch.setenv("T2VU_DISABLE_PLUGINS", "example,localization")
    reg = PluginManager().registry
    assert "example_l1" not in reg.names("loss")
    assert "localization" not in reg.names("loss")
    assert "preservation" in reg.names("loss")


def test_name_collision_names_both_plugins(tmp_path, monkeypatch):
    make_dist(tmp_path, "t2vu-clash", "t2vu_clash", """
        from t2vu.core.hookspecs import hookimpl
        @hookimpl
        def register_losses(register):
            register("preservation", "x:y", summary="clash")
    """, ep_name="clash")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RegistryError) as exc:
        PluginManager()
    assert "t2vu.losses.preservation" in str(exc.value) and "clash" in str(exc.value)


def test_broken_and_misspelt_plugins_are_isolated(tmp_path, monkeypatch):
    make_dist(tmp_path, "t2vu-broken", "t2vu_broken", "import does_not_exist_anywhere\n", ep_name="broken")
    make_dist(tmp_path, "t2vu-typo", "t2vu_typo", """
        from t2vu.core.hookspecs import hookimpl
        @hookimpl
        def register_backbone(register):
            pass
    """, ep_name="typo")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = PluginManager().registry
    failed = {f.name: f for f in reg.failed}
    assert set(failed) == {"broken", "typo"}
    assert "ModuleNotFoundError" in failed["broken"].first_line
    assert failed["broken"].distribution == "t2vu-broken" and failed["broken"].version == "1.2.3"
    assert "register_backbone" in failed["typo"].first_line
    # everything else still works
    assert "cogvideox" in reg.names("backbone") and "example_l1" in reg.names("loss")


def test_registry_unknown_suggests():
    reg = plugins.get_registry()
    assert "did you mean 'negative_guidance'" in reg.unknown_message("loss", "negative_guidence")


def test_registry_add_rejects_duplicates():
    reg = Registry()
    comp = Component("loss", "a", object, object, "", "p1")
    reg.add(comp)
    with pytest.raises(RegistryError, match="'p1'.*'p2'"):
        reg.add(Component("loss", "a", object, object, "", "p2"))
