"""Pass infrastructure: the pass contract, the registry, recipe-built passes, node rules and the PassManager."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from compilekit import pipeline
from compilekit.errors import PassError, RecipeError
from compilekit.inputs import make_inputs
from compilekit.ir import op_histogram
from compilekit.passes.dead_code import DeadCodePass
from compilekit.pipeline import (
    NodeRule,
    Pass,
    PassManager,
    PassOptions,
    PassResult,
    apply_node_rules,
    available_passes,
    build_passes,
    histogram_delta,
    register_pass,
)
from compilekit.recipe import PassSpec, load_recipe

aten = torch.ops.aten

class _Affine(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, 4, generator=gen))

    def forward(self, x):
        return (x @ self.w) * 1 * 2  # `* 1` is removable by cleanup.dead_code


@pytest.fixture
def affine(export_module):
    """A fresh tiny program per test (some tests below corrupt it on purpose)."""
    return export_module(_Affine())


@pytest.fixture(scope="module")
def bert(bert):
    """The shared tiny BERT (tests/conftest.py) with one batch of data at sizes unlike the export example."""
    data = make_inputs(bert.inputs, {"batch": 3, "seq": 11}, vocab_size=128, generator=torch.Generator().manual_seed(1))
    return bert.program, bert.adapter, data


def _output_node(graph: torch.fx.Graph) -> torch.fx.Node:
    return next(n for n in graph.nodes if n.op == "output")


def _negate_output(graph: torch.fx.Graph) -> None:
    out = _output_node(graph)
    value = out.args[0][0]
    with graph.inserting_before(out):
        neg = graph.call_function(aten.neg.default, (value,))
    neg.meta["val"] = value.meta["val"]
    out.args = ((neg,),)


# ---------------------------------------------------------------------------------- the contract


class _InPlaceEditor(Pass):
    name = "test.in_place_editor"

    def call(self, program):
        _negate_output(program.graph)  # edits the graph it was given
        return PassResult(program, True)


class _DishonestPass(Pass):
    name = "test.dishonest"

    def call(self, program):
        gm = program.copy_graph()
        _negate_output(gm.graph)
        return PassResult(program.with_graph(gm), modified=False)


class _HonestPass(Pass):
    name = "test.honest"

    def call(self, program):
        gm = program.copy_graph()
        _negate_output(gm.graph)
        return PassResult(program.with_graph(gm), modified=True, summary="negated the output")


def test_pass_that_edits_its_input_in_place_is_an_error(affine):
    with pytest.raises(PassError, match="test.in_place_editor changed its input program in place") as info:
        _InPlaceEditor()(affine)
    assert "copy_graph()" in info.value.hint


def test_pass_that_reports_unmodified_but_changed_the_graph_is_an_error(affine):
    with pytest.raises(PassError, match="test.dishonest reported modified=False but changed the graph"):
        _DishonestPass()(affine)


def test_honest_pass_passes_the_contract(affine):
    x = torch.randn(3, 8)
    result = _HonestPass()(affine)
    assert result.modified and op_histogram(result.program.graph)["aten.neg"] == 1
    assert torch.equal(result.program.run({"x": x})["output"], -affine.run({"x": x})["output"])
    assert "aten.neg" not in op_histogram(affine.graph)


def test_pass_options_are_frozen_and_typed():
    class Opts(PassOptions):
        k: int = 2

    class WithOptions(Pass):
        name = "test.with_options"
        Options = Opts

    p = WithOptions({"k": 3})
    assert p.config() == {"name": "test.with_options", "version": 1, "options": {"k": 3}}
    with pytest.raises(ValueError):
        p.options.k = 4  # frozen
    with pytest.raises(ValueError, match="extra"):
        WithOptions({"k": 3, "j": 1})
    with pytest.raises(TypeError, match="takes Opts, got PassOptions"):
        WithOptions(PassOptions())


# -------------------------------------------------------------------------------------- registry


def test_registering_two_passes_under_one_name_is_an_error(monkeypatch):
    monkeypatch.setattr(pipeline, "_PASSES", dict(pipeline._PASSES))

    class First(Pass):
        name = "test.duplicate"

    class Second(Pass):
        name = "test.duplicate"

    assert register_pass(First) is First
    assert register_pass(First) is First  # the same class again (a re-import) is fine
    with pytest.raises(ValueError, match="'test.duplicate' is already registered by .*First"):
        register_pass(Second)
    assert pipeline._PASSES["test.duplicate"] is First


def test_catalogue_lists_dead_code():
    assert available_passes()["cleanup.dead_code"] is DeadCodePass


def test_build_passes_from_specs():
    passes = build_passes([PassSpec(name="cleanup.dead_code"), PassSpec(name="cleanup.dead_code", options={"noop": False})])
    assert [type(p) for p in passes] == [DeadCodePass, DeadCodePass]
    assert [p.options.noop for p in passes] == [True, False]


def test_build_passes_unknown_name_is_a_recipe_error():
    with pytest.raises(RecipeError, match="unknown pass 'cleanup.dead_cod'") as info:
        build_passes([PassSpec(name="cleanup.dead_cod")])
    assert "cleanup.dead_code" in info.value.hint


@pytest.mark.parametrize("options, problem, hint", [
    # A bad value: the hint is that option, its type, default and description.
    ({"noop": "maybe"}, "noop: Input should be a valid boolean",
     "noop: bool = True: Bypass no-op ops before removing dead nodes. (`compilekit passes` lists every option of "
     "cleanup.dead_code)"),
    # An unknown name: every option.
    ({"bogus": 1}, "bogus: Extra inputs are not permitted", "options of cleanup.dead_code: noop: bool = True")])
def test_build_passes_bad_options_is_a_recipe_error(options, problem, hint):
    with pytest.raises(RecipeError, match="bad options for pass 'cleanup.dead_code'") as info:
        build_passes([PassSpec(name="cleanup.dead_code", options=options)])
    assert problem in info.value.message
    assert info.value.hint == hint


def test_option_types_read_as_written_in_a_recipe():
    from compilekit.pipeline import get_pass, option_signature

    fields = get_pass("quantize.int8").Options.model_fields
    assert option_signature("alpha", fields["alpha"]) == "alpha: float | 'auto' = 0.5"
    assert option_signature("skip", fields["skip"]) == "skip: list[str] | 'auto' = []"  # a default factory, called
    assert option_signature("budget_outputs", fields["budget_outputs"]) == "budget_outputs: list[str] | None = None"


def test_build_passes_errors_point_at_the_recipe_line(tiny_recipe):
    path = tiny_recipe({"passes": ["cleanup.dead_code", {"name": "cleanup.dead_code", "options": {"bogus": 1}}]})
    loaded = load_recipe(path)
    with pytest.raises(RecipeError) as info:
        build_passes(loaded.recipe.passes, loaded)
    lines = path.read_text().splitlines()
    line = int(info.value.message.split(":")[1])
    assert info.value.message.startswith(f"{path.resolve()}:")
    assert "passes[1].options" in info.value.message
    assert lines[line - 1].strip() == "options:" and lines[line].strip() == "bogus: 1"


# ----------------------------------------------------------------------------------------- rules


def test_apply_node_rules_applies_and_records_why_not(affine):
    gm = affine.copy_graph()
    graph = gm.graph
    calls = []

    def check(node):
        calls.append(node.args[1])
        return None if node.args[1] == 1 else f"scalar is {node.args[1]}, not 1"

    def rewrite(node):
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        return True

    never = NodeRule("never", frozenset({aten.matmul.default}), lambda n: "matmul is never rewritten", lambda n: True)
    unit = NodeRule("unit-mul", frozenset({aten.mul.Tensor}), check, rewrite)
    stats = apply_node_rules(graph, [never, unit])
    assert calls == [1, 2]  # only the nodes in the pattern were checked, in graph order
    assert stats.applied == Counter({"unit-mul": 1}) and stats.total == 1
    assert stats.to_dict() == {"applied": {"unit-mul": 1},
                               "skipped": {"never": {"matmul is never rewritten": 1}, "unit-mul": {"scalar is 2, not 1": 1}}}
    assert op_histogram(graph) == {"aten.matmul": 1, "aten.mul.Tensor": 1}


def test_rewrite_that_changes_nothing_is_not_counted(affine):
    graph = affine.copy_graph().graph
    stats = apply_node_rules(graph, [NodeRule("noop", frozenset({aten.mul.Tensor}), lambda n: None, lambda n: False)])
    assert stats.total == 0 and stats.to_dict() == {"applied": {}, "skipped": {}}


# ------------------------------------------------------------------------------------- the manager


class _Boom(Pass):
    name = "test.boom"

    def call(self, program):
        raise RuntimeError("kaput")


class _BoomInsideCompilekit(Pass):
    name = "test.boom_inside"

    def call(self, program):
        from compilekit.ir import op_histogram

        return op_histogram(None)  # fails inside compilekit/ir.py


class _BreaksGraph(Pass):
    name = "test.breaks_graph"

    def call(self, program):
        # ExportedProgram verifies the graph when with_graph builds it, so break it afterwards
        new = program.with_graph(program.copy_graph())
        out = _output_node(new.graph)
        first = next(n for n in new.graph.nodes if n.op == "placeholder")
        with new.graph.inserting_after(first):  # uses a value before it is defined
            new.graph.call_function(aten.neg.default, (out.args[0][0],))
        return PassResult(new, True)


def test_with_graph_rejects_a_graph_that_does_not_lint(affine):
    gm = affine.copy_graph()
    out = _output_node(gm.graph)
    with gm.graph.inserting_after(next(iter(gm.graph.nodes))):
        gm.graph.call_function(aten.neg.default, (out.args[0][0],))
    with pytest.raises(RuntimeError, match="used before it has been defined"):
        affine.with_graph(gm)


def test_ledger_has_one_entry_per_pass_with_timing_nodes_and_metrics(bert):
    program, adapter, data = bert
    reference = adapter.named(data)
    checked = []

    def checker(p):
        checked.append(p)
        out = p.run(data)
        return {"max_abs": max((out[k] - reference[k]).abs().max().item() for k in reference)}

    seen = []
    manager = PassManager([DeadCodePass(), DeadCodePass()], checker=checker, on_pass=lambda *a: seen.append(a))
    final, ledger = manager.run(program)

    assert seen == [("cleanup.dead_code", 1, 2), ("cleanup.dead_code", 2, 2)]
    assert [e.name for e in ledger] == ["cleanup.dead_code", "cleanup.dead_code"]
    assert [e.modified for e in ledger] == [True, False]
    assert all(e.seconds > 0 and e.check_seconds >= 0 for e in ledger)
    assert ledger[0].nodes == ledger[1].nodes == len(final.graph.nodes) < len(program.graph.nodes)
    assert ledger[0].options == {"noop": True}
    assert ledger[0].stats["noop_removed"]["dropout"] == 5 and ledger[0].summary.startswith("removed")
    assert 0 <= ledger[0].metrics["max_abs"] <= 1e-5
    # an unmodified pass is not re-checked: its row carries the previous numbers
    assert len(checked) == 1 and checked[0] is final and ledger[1].metrics == ledger[0].metrics
    d = ledger[0].to_dict()
    assert set(d) == {"name", "options", "modified", "seconds", "check_seconds", "nodes", "summary", "stats", "metrics"}


def test_ledger_records_the_error_a_pass_introduces(affine):
    x = torch.randn(4, 8)
    reference = affine.run({"x": x})["output"]
    manager = PassManager([_HonestPass(), DeadCodePass()],
                          checker=lambda p: {"max_abs": (p.run({"x": x})["output"] - reference).abs().max().item()})
    _, ledger = manager.run(affine)
    assert ledger[0].metrics["max_abs"] == pytest.approx(2 * reference.abs().max().item(), rel=1e-6)
    assert ledger[1].modified and ledger[1].metrics == ledger[0].metrics  # removing `* 1` changes nothing


def test_first_pass_is_checked_even_when_it_changes_nothing(affine):
    checked = []
    _, ledger = PassManager([DeadCodePass({"noop": False})], checker=lambda p: checked.append(p) or {"ok": 1}).run(affine)
    assert ledger[0].modified is False and len(checked) == 1 and ledger[0].metrics == {"ok": 1}


def test_crashing_pass_is_wrapped_naming_it_and_the_passes_before(affine):
    manager = PassManager([DeadCodePass(), _HonestPass(), _Boom()])
    with pytest.raises(PassError, match="pass test.boom failed: RuntimeError: kaput") as info:
        manager.run(affine)
    assert "['cleanup.dead_code', 'test.honest']" in info.value.hint
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "(at " not in info.value.message  # it failed in the test's own code, not compilekit's


def test_crashing_pass_says_where_in_compilekit_it_failed(affine):
    with pytest.raises(PassError, match=r"pass test.boom_inside failed: AttributeError: .* \(at compilekit/ir.py:\d+ "
                                        r"in op_histogram\)") as info:
        PassManager([_BoomInsideCompilekit()]).run(affine)
    assert "bug in the pass" in info.value.hint and "COMPILEKIT_DEBUG=1" in info.value.hint


def test_contract_violation_inside_the_manager_stays_a_pass_error(affine):
    with pytest.raises(PassError, match="test.in_place_editor changed its input program in place"):
        PassManager([_InPlaceEditor()]).run(affine)


def test_invalid_graph_after_a_pass_is_caught(affine):
    with pytest.raises(PassError, match="pass test.breaks_graph left an invalid graph") as info:
        PassManager([DeadCodePass(), _BreaksGraph()]).run(affine)
    assert "cleanup.dead_code" in info.value.hint


def test_program_that_no_longer_runs_is_caught(affine):
    def checker(p):
        raise RuntimeError("shape mismatch")

    with pytest.raises(PassError, match="no longer runs after pass test.honest: RuntimeError: shape mismatch"):
        PassManager([_HonestPass()], checker=checker).run(affine)


def test_stop_after(affine):
    final, ledger = PassManager([_HonestPass(), DeadCodePass(), _Boom()]).run(affine, stop_after="cleanup.dead_code")
    assert [e.name for e in ledger] == ["test.honest", "cleanup.dead_code"]
    assert "aten.neg" in op_histogram(final.graph)


def test_dump_dir_writes_numbered_files(affine, tmp_path):
    dump = tmp_path / "ir"
    final, _ = PassManager([_HonestPass(), DeadCodePass()], dump_dir=dump).run(affine)
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["00-export.txt", "01-test.honest.txt", "02-cleanup.dead_code.txt"]
    texts = [(dump / f).read_text(encoding="utf-8") for f in files]
    assert texts[0] == affine.describe(graph=True) and texts[2] == final.describe(graph=True)
    assert "aten.neg" not in texts[0] and "aten.neg" in texts[1]
    assert "batch: min 1, opt 4, max 16" in texts[0] and "graph():" in texts[0]
    assert texts[1].count("aten.mul.Tensor") > texts[2].count("aten.mul.Tensor")  # `* 1` removed


def test_histogram_delta(affine):
    result = DeadCodePass()(affine)
    assert histogram_delta(affine, result.program) == {"aten.mul.Tensor": -1}
    assert histogram_delta(affine, affine) == {}
