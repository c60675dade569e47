import pytest

from optimum_mosaic import PrunedConfig


def test_defaults_and_auto_resolution():
    c = PrunedConfig()  # the measured best within 1.5x SparseGPT's time (issue 12; README "Defaults")
    assert (c.sparsity, c.allocation, c.pruner, c.nsamples, c.seqlen) == (0.5, "uniform", "alps_warm", 128, 2048)
    assert (c.dampening, c.block_size, c.structured_sparsity) == (0.01, 128, 0.0) and not c.search_grid
    assert c.calibration_corpus == "mixed"  # issue 19: held-out code and prose windows
    mosaic = PrunedConfig(allocation="projection")  # Mosaic's own allocation searches λ and M
    assert (mosaic.lamda, mosaic.outlier_threshold) == ("auto", "auto")
    owl = PrunedConfig(allocation="layer")
    assert (owl.lamda, owl.outlier_threshold) == (0.08, 5.0)


def test_nm_pattern_fixes_sparsity_and_uniform_allocation():
    c = PrunedConfig(pattern="2:4")
    assert (c.sparsity, c.allocation, c.nm) == (0.5, "uniform", (2, 4))
    assert PrunedConfig(pattern="1:4").sparsity == 0.25


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(sparsity=0.0), "sparsity"),
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity=-0.2), "sparsity"),
        (dict(pattern="4:4"), "N:M needs 0 < N < M"),
        (dict(pattern="5:4"), "N:M needs 0 < N < M"),
        (dict(pattern="2-4"), "pattern"),
        (dict(pattern="2:4", sparsity=0.6), "sparsity"),
        (dict(pattern="2:4", allocation="projection"), "allocation"),
        (dict(allocation="global"), "allocation"),
        (dict(pruner="obc"), "pruner"),
        (dict(lamda=0.7), "lamda"),
        (dict(lamda=-0.5), "lamda"),
        (dict(outlier_threshold=0.5), "outlier_threshold"),
        (dict(nsamples=0), "nsamples"),
        (dict(dampening=0), "dampening"),
        (dict(targets=["qkv"]), "targets"),
        (dict(format_version=99), "format_version"),
        (dict(pruner="alps_warm", admm_rho=0), "admm_rho"),
        (dict(pruner="sparsegpt", admm_rho=0.5), "admm_rho: used only by pruner alps / alps_warm"),
        (dict(pruner="wanda", cg_iterations=3), "cg_iterations: used only by"),
        (dict(pruner="sparsegpt_refit", admm_iterations=3), "admm_iterations: used only by"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PrunedConfig(**kwargs)


def test_round_trip_through_dict():
    c = PrunedConfig(sparsity=0.7, allocation="layer", ignore=[r"layers\.0\."])
    assert PrunedConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown PrunedConfig fields"):
        PrunedConfig.from_dict({**c.to_dict(), "ratio": 1})
