"""The package imports without a GPU and reports how it was built."""
import mpt_kernels as mk


def test_build_info_fields():
    info = mk.build_info()
    for key in ("version", "cxx_compiler", "cxx_flags", "cpu_features", "cuda", "cuda_archs", "ops"):
        assert key in info
    assert info["version"] == mk.__version__
    assert isinstance(info["cpu_features"], list)
    if info["cuda"]:
        assert "80" in info["cuda_archs"] or "90" in info["cuda_archs"]


def test_cuda_available_is_bool():
    assert isinstance(mk.cuda_available(), bool)


def test_subpackages_load_lazily():
    assert callable(mk.model.apply_to_hf)
    assert callable(mk.export.export_fastertransformer)
    import pytest

    with pytest.raises(AttributeError):
        mk.no_such_thing
