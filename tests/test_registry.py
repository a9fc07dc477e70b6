"""A new estimator, grouping or engine is one registered definition: the config accepts its name,
the pipeline uses it, and an unknown name's error lists what is registered."""
import pytest
import torch

from transquant.core.config import validate
from transquant.core.errors import TransquantError
from transquant.core.registry import Registry
from transquant.deploy.engines import ENGINES, EngineKind, require_engine
from transquant.deploy.runtime import EngineError
from transquant.quant.ptq import calibrate, plan_sites, quantize_weights_
from transquant.quant.quantizers import asymmetric_grid
from transquant.quant.ranges import ESTIMATORS, GROUPINGS, WEIGHT_ESTIMATORS, GroupMinMax, RangeEstimator, make_groups
from transquant.quant.sites import find_sites

from .conftest import random_batches, tiny_bert


def scoped(monkeypatch, registry: Registry) -> Registry:
    """Registrations made during the test are gone after it."""
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    return registry


@pytest.fixture
def fixed_estimator(monkeypatch):
    """Every site gets the range [-1, 1], whatever it observes."""
    @scoped(monkeypatch, ESTIMATORS).register("fixed")
    class Fixed(RangeEstimator):
        def observe(self, x: torch.Tensor) -> None:
            pass

        def range(self) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.tensor(-1.0), torch.tensor(1.0)
    return Fixed


def test_registered_estimator_validates_and_calibrates(make_cfg, fixed_estimator):
    cfg = make_cfg("quant=w8a8", "quant.estimator=fixed")
    validate(cfg)
    model = tiny_bert()
    sites = find_sites(model)
    plans = plan_sites(sites, cfg.quant)
    assert plans and all(p.estimator == "fixed" for p in plans.values())
    qa = calibrate(model, sites, plans, random_batches(2), torch.device("cpu"))
    assert all(isinstance(e, fixed_estimator) for e in qa.estimators.values())
    expected = asymmetric_grid(torch.tensor(-1.0), torch.tensor(1.0), 8)
    assert all(torch.equal(g.scale, expected.scale) and torch.equal(g.zero_point, expected.zero_point)
               for g in qa.grids.values())


def test_unknown_estimator_lists_the_registered_ones(make_cfg, fixed_estimator):
    with pytest.raises(TransquantError, match=r"^quant.estimator=nope: allowed minmax, percentile, .*\bfixed$"):
        validate(make_cfg("quant.estimator=nope"))


def test_peg_is_chosen_by_peg_sites_not_by_name():
    """PEG's estimator serves the plans of ``quant.peg_sites``; ``quant.estimator`` does not list it."""
    assert "peg" not in ESTIMATORS and {"minmax", "percentile", "mse", "dynamic"} <= set(ESTIMATORS)
    assert ESTIMATORS["peg"] is GroupMinMax


def test_registered_grouping_validates_and_groups(make_cfg, monkeypatch):
    @scoped(monkeypatch, GROUPINGS).register("reversed")
    def reversed_blocks(lo, hi, k):
        return GROUPINGS["contiguous"](lo, hi, k).flip(0)

    validate(make_cfg("quant=peg", "quant.grouping=reversed"))
    assert make_groups(torch.zeros(6), torch.ones(6), 2, "reversed").tolist() == [1, 1, 1, 0, 0, 0]


def test_registered_weight_estimator_sets_the_weight_grids(make_cfg, monkeypatch):
    @scoped(monkeypatch, WEIGHT_ESTIMATORS).register("half")
    def half(w, bits):
        return w.abs().max() / 2

    validate(make_cfg("quant=w8a8", "quant.weight_estimator=half"))
    model = tiny_bert()
    absmax = model.classifier.weight.abs().max()
    grids = quantize_weights_(model, 8, "half")
    assert grids["classifier"].scale == pytest.approx((absmax / 2 / 127).item())


def test_registered_engine_is_accepted_and_checks_its_packages(make_cfg, monkeypatch):
    @scoped(monkeypatch, ENGINES).register("exotic")
    class Exotic(EngineKind):
        packages = (("transquant_no_such_runtime", "exotic-runtime"),)

    validate(make_cfg("profile.engine=exotic"))
    with pytest.raises(EngineError, match=r"profile.engine=exotic: the 'transquant_no_such_runtime' package is "
                                            r"not installed \(pip install exotic-runtime\)"):
        require_engine("exotic")


def test_unknown_name_in_code_lists_what_is_registered():
    """Callers that skip config validation get the same one-line error."""
    with pytest.raises(TransquantError, match="^quant.weight_estimator=l2: allowed minmax, mse$"):
        quantize_weights_(tiny_bert(), 8, "l2")
    with pytest.raises(TransquantError, match="^quant.grouping=random: allowed contiguous, sorted, gap$"):
        make_groups(torch.zeros(4), torch.ones(4), 2, "random")


def test_a_name_registers_once():
    registry = Registry("x.kind")
    registry.register("a")(object)
    with pytest.raises(ValueError, match="x.kind=a is registered twice"):
        registry.register("a")(object)
