import pytest

from bench.core.registry import ATTACKS, DATASETS, DEFENSES, MODELS, Registry, RegistryError


def test_register_create_and_list():
    reg = Registry("widget")

    @reg.register("alpha")
    class Alpha:
        def __init__(self, size=1):
            self.size = size

    reg.register_lazy("beta", "collections:OrderedDict")
    assert reg.list() == ["alpha", "beta"]
    assert reg.list("a*") == ["alpha"]
    a1, a2 = reg.create("alpha", size=None), reg.create("alpha", size=3)
    assert a1.size == 1 and a2.size == 3 and a1 is not reg.create("alpha")
    assert type(reg.create("beta")).__name__ == "OrderedDict"


def test_duplicate_name_is_an_error():
    reg = Registry("widget")
    reg.register("x", lambda: 1)
    with pytest.raises(RegistryError, match="duplicate widget name 'x'"):
        reg.register("x", lambda: 2)


def test_unknown_name_suggests():
    reg = Registry("widget")
    reg.register("undefended", lambda: 1)
    with pytest.raises(RegistryError) as e:
        reg.create("undefnded")
    assert "did you mean 'undefended'" in str(e.value) and "\n" not in str(e.value)


def test_bad_lazy_target_names_the_fix():
    reg = Registry("widget")
    reg.register_lazy("ghost", "no_such_module_xyz:Thing")
    with pytest.raises(RegistryError, match="cannot be imported"):
        reg.create("ghost")


def test_bad_options_are_a_registry_error():
    reg = Registry("widget")
    reg.register("a", lambda *, size=1: size)
    with pytest.raises(RegistryError, match="bad options for widget 'a'"):
        reg.create("a", colour="red")


def test_entry_point_plugins_are_discovered(monkeypatch):
    from importlib import metadata

    ep = metadata.EntryPoint(name="plugin_thing", value="collections:Counter",
                             group="robustmatrix.widgets")
    monkeypatch.setattr(metadata, "entry_points",
                        lambda group=None: [ep] if group == "robustmatrix.widgets" else [])
    reg = Registry("widget", entry_point_group="robustmatrix.widgets")
    assert "plugin_thing" in reg.list()
    assert type(reg.create("plugin_thing")).__name__ == "Counter"


@pytest.mark.parametrize("registry", [DEFENSES, ATTACKS, DATASETS, MODELS],
                         ids=lambda r: r.kind)
def test_real_registries_have_test_entries(registry):
    assert registry.list("test_*"), f"the {registry.kind} registry has no tiny test_* entry"
