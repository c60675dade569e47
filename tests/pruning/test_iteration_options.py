"""``PrunedConfig(admm_iterations=..., cg_iterations=..., admm_rho=...)`` reach the kernels; unset, the kernels' defaults apply."""

import pytest
from conftest import tiny_llama, token_windows

from optimum_mosaic import PrunedConfig, Pruner, registry


def prune_with_spy(monkeypatch, pruner: str, **config):
    seen = []
    method = registry.get_method("unstructured", pruner)

    def spy(weight, stats, sparsity, **options):
        seen.append(options)
        return method.fn(weight, stats, sparsity, **options)

    monkeypatch.setitem(
        registry._REGISTRY, ("unstructured", pruner), registry.Method(pruner, method.kind, spy, method.needs)
    )
    config = PrunedConfig(sparsity=0.5, allocation="uniform", pruner=pruner, nsamples=4, seqlen=32, **config)
    Pruner(tiny_llama()).prune(config, calibration_dataset=token_windows(4, 32))
    return seen


def test_iterations_reach_the_kernel(monkeypatch):
    seen = prune_with_spy(monkeypatch, "alps_warm", admm_iterations=3, cg_iterations=2, admm_rho=0.7)
    assert seen and all(o["max_iterations"] == 3 and o["cg_iterations"] == 2 and o["rho"] == 0.7 for o in seen)
    infos = [o["info"] for o in seen]
    assert all(i["iterations"] <= 3 and i["cg_iterations"] <= 2 for i in infos)


def test_unset_iterations_leave_the_kernel_defaults(monkeypatch):
    seen = prune_with_spy(monkeypatch, "sparsegpt_refit")
    assert seen and not any({"max_iterations", "cg_iterations", "rho"} & set(o) for o in seen)
    assert all(1 <= o["info"]["cg_iterations"] <= 10 for o in seen)


@pytest.mark.parametrize("name", ["admm_iterations", "cg_iterations"])
def test_negative_iterations_are_rejected(name):
    with pytest.raises(ValueError, match=name):
        PrunedConfig(**{name: -1})
