from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from compilekit.errors import VerificationError
from compilekit.verify import GATE_METRICS, SQNR_CAP_DB, compare, evaluate_gates


def test_identical_outputs_are_perfect():
    x = torch.randn(4, 3, 5)
    m = compare([{"y": x}], [{"y": x.clone()}])["y"]
    assert (m.samples, m.max_abs, m.max_rel) == (4, 0.0, 0.0)
    assert m.cosine_min == pytest.approx(1.0, abs=1e-12) and m.cosine_mean == pytest.approx(1.0, abs=1e-12)
    assert m.sqnr_db == SQNR_CAP_DB and m.top1 is None
    assert json.loads(json.dumps(m.to_dict(), allow_nan=False))["sqnr_db"] == SQNR_CAP_DB


def test_known_perturbation_matches_hand_computed_metrics():
    m = compare([{"y": np.array([[3.0, 4.0]])}], [{"y": np.array([[3.0, 4.5]])}])["y"]
    assert m.max_abs == pytest.approx(0.5, rel=1e-12)
    assert m.max_rel == pytest.approx(0.125, rel=1e-12)  # 0.5 / max|ref| = 0.5 / 4
    cos = (9 + 18) / (5 * math.sqrt(9 + 20.25))  # = 0.99846...
    assert m.cosine_min == pytest.approx(cos, abs=1e-12) and m.cosine_mean == pytest.approx(cos, abs=1e-12)
    assert m.sqnr_db == pytest.approx(20.0, abs=1e-9)  # 10 log10(25 / 0.25)
    d = m.to_dict()
    assert d["cosine_min"] == round(cos, 8) and d["max_abs"] == 0.5 and d["samples"] == 1


def test_batches_aggregate_samples_and_min_over_batches():
    ref = [{"y": np.eye(2)}, {"y": np.array([[1.0, 0.0]])}]
    cand = [{"y": np.eye(2)}, {"y": np.array([[0.0, 1.0]])}]  # last sample is orthogonal
    m = compare(ref, cand)["y"]
    assert m.samples == 3
    assert m.cosine_min == pytest.approx(0.0, abs=1e-12)
    assert m.cosine_mean == pytest.approx(2 / 3, abs=1e-12)
    assert m.max_abs == pytest.approx(1.0) and m.sqnr_db == pytest.approx(10 * math.log10(3 / 2), abs=1e-9)


def test_cosine_is_per_sample_one_bad_sample_drives_min_not_mean():
    ref = np.random.default_rng(0).standard_normal((100, 8))
    cand = ref.copy()
    cand[17] = -ref[17]  # one sample flipped: cosine -1
    m = compare([{"y": ref}], [{"y": cand}])["y"]
    assert m.cosine_min == pytest.approx(-1.0, abs=1e-12)
    assert m.cosine_mean == pytest.approx(0.98, abs=1e-12)  # (99 - 1) / 100


def test_cosine_zero_vector_edge_cases():
    ref = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    cand = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    m = compare([{"y": ref}], [{"y": cand}])["y"]
    assert m.cosine_min == 0.0 and m.cosine_mean == pytest.approx(1 / 3, abs=1e-12)  # 1, 0, 0


def test_top1_agreement_on_constructed_logits():
    ref = torch.zeros(2, 3, 4)
    ref[..., 1] = 1.0  # argmax is class 1 at all 6 positions
    cand = ref.clone()
    cand[0, 0, 3] = 2.0
    cand[1, 2, 0] = 5.0  # two positions now disagree
    m = compare([{"logits": ref, "h": ref}], [{"logits": cand, "h": cand}], logits=["logits"])
    assert m["logits"].top1 == pytest.approx(4 / 6, abs=1e-12)
    assert m["h"].top1 is None


def test_integer_and_bfloat16_candidates_compare_in_float64():
    m = compare([{"ids": np.array([[1, 2, 3]])}], [{"ids": torch.tensor([[1, 2, 4]], dtype=torch.int32)}])["ids"]
    assert m.max_abs == 1.0 and m.max_rel == pytest.approx(1 / 3, rel=1e-12)
    x = torch.randn(3, 16)
    b = compare([{"y": x}], [{"y": x.to(torch.bfloat16)}])["y"]
    assert 0 < b.max_rel < 2**-7 and b.cosine_min > 0.9999  # bf16 has an 8-bit mantissa


def test_nan_in_candidate_shows_and_fails_every_gate():
    ref = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    ref[2] = torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0])
    cand = ref.clone()
    cand[2, 0] = float("nan")  # np.argmax picks the NaN (index 0 = ref argmax): must not count as a hit
    m = compare([{"y": ref}], [{"y": cand}], logits=["y"])
    assert math.isnan(m["y"].max_abs) and math.isnan(m["y"].cosine_min) and math.isnan(m["y"].sqnr_db)
    assert m["y"].top1 == pytest.approx(3 / 4)  # the NaN row counts as a miss
    json.dumps(m["y"].to_dict(), allow_nan=False)  # NaN becomes null, still valid JSON
    bounds = {"cosine_min": -1.0, "cosine_mean": -1.0, "sqnr_db": -100.0, "max_abs": 1e9, "max_rel": 1e9}
    results = evaluate_gates(m, bounds)
    assert len(results) == 5 and not any(r.passed for r in results)


def test_gates_pass_and_fail_in_both_directions():
    m = compare([{"a": np.array([[3.0, 4.0]]), "b": np.array([[1.0, 1.0]])}],
                [{"a": np.array([[3.0, 4.5]]), "b": np.array([[1.0, 1.0]])}])
    res = {(r.metric, r.output): r for r in evaluate_gates(m, {"sqnr_db": 30.0, "max_abs": 0.4})}
    assert not res["sqnr_db", "a"].passed and res["sqnr_db", "b"].passed  # 20 dB < 30; b is perfect
    assert not res["max_abs", "a"].passed and res["max_abs", "b"].passed  # 0.5 > 0.4
    res = evaluate_gates(m, {"sqnr_db": 19.9, "max_abs": 0.5}, outputs=["a"])
    assert [(r.output, r.passed) for r in res] == [("a", True), ("a", True)]
    assert res[0].to_dict() == {"metric": "sqnr_db", "output": "a", "value": 20.0, "bound": 19.9, "op": ">=",
                                "passed": True}


def test_top1_gate_skips_non_logits_and_needs_one():
    ref = np.array([[0.0, 1.0], [1.0, 0.0]])
    m = compare([{"l": ref, "h": ref}], [{"l": ref[::-1].copy(), "h": ref}], logits=["l"])
    res = evaluate_gates(m, {"top1": 0.5})
    assert [(r.output, r.value, r.passed) for r in res] == [("l", 0.0, False)]
    with pytest.raises(VerificationError, match="logits"):
        evaluate_gates(m, {"top1": 0.5}, outputs=["h"])


def test_bad_gates_and_inputs_raise():
    m = compare([{"y": np.ones((1, 2))}], [{"y": np.ones((1, 2))}])
    with pytest.raises(VerificationError, match="known gates: .*cosine_min") as e:
        evaluate_gates(m, {"cosine_max": 0.9})
    assert all(k in str(e.value) for k in GATE_METRICS)
    with pytest.raises(VerificationError, match="not among"):
        evaluate_gates(m, {"max_abs": 1.0}, outputs=["z"])
    with pytest.raises(VerificationError, match=r"batch 1, output 'y'.*shape"):
        compare([{"y": np.ones((1, 2))}] * 2, [{"y": np.ones((1, 2))}, {"y": np.ones((1, 3))}])
    with pytest.raises(VerificationError, match="batch 0: candidate outputs"):
        compare([{"y": np.ones((1, 2))}], [{"z": np.ones((1, 2))}])
    with pytest.raises(VerificationError, match="batches"):
        compare([{"y": np.ones((1, 2))}], [])
    with pytest.raises(VerificationError, match="logits"):
        compare([{"y": np.ones((1, 2))}], [{"y": np.ones((1, 2))}], logits=["x"])
