"""Every recipe at the smoke scale: its files, its numbers, and verdicts that follow the data."""

import copy
import dataclasses
import json
import math
import shutil

import pytest

from sgdstab import run_spec
from sgdstab.errors import InputError
from sgdstab.experiments import (
    EXPERIMENTS,
    configure,
    e1_alignment,
    e2_frobenius_bound,
    e3_size,
    e4_escape,
    e5_criteria,
    reproduce,
    runs,
    smoke_configs,
)
from sgdstab.experiments.config import override
from sgdstab.io import read_json, read_jsonl, write_json_atomic
from sgdstab.report import build_blocks, render_markdown
from sgdstab.stability import CRITERIA


def run_folders(root, name):
    return sorted(p for p in (root / name).iterdir() if p.is_dir())


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_run_folders_are_complete(smoke_suite, name):
    root, analyses = smoke_suite
    folders = run_folders(root, name)
    assert folders
    for folder in folders:
        config, final = read_json(folder / "config.json"), read_json(folder / "final.json")
        assert final["config"] == config and final["run_id"] == folder.name
        assert read_jsonl(folder / "metrics.jsonl")[0]["step"] == 0
        assert (folder / "checkpoint.pt").is_file()
    assert read_json(root / name / "analysis.json") == json.loads(json.dumps(analyses[name]))
    verdicts = [check["holds"] for check in analyses[name]["checks"]]
    assert verdicts, "an experiment must state at least one checked claim"
    expected = False if False in verdicts else (None if None in verdicts else True)
    assert analyses[name]["holds"] is expected
    assert read_json(root / "config.json")["experiments"][name]["scale"] == "smoke"


def test_e1_measures_mu_on_its_schedule(smoke_suite):
    _, analyses = smoke_suite
    rows = analyses["E1"]["rows"]
    assert [r["family"] for r in rows] == ["linear", "CNN"]
    for row in rows:
        assert [p["step"] for p in row["curve"]] == [0, 20, 40]
        assert all(0 < p["mu"] < 10 for p in row["curve"])
        assert row["mu_min"] == min(p["mu"] for p in row["curve"])
    assert analyses["E1"]["checks"][0]["holds"] == (
        min(r["mu_min"] for r in rows) >= analyses["E1"]["config"]["mu_floor"]
    )


def test_e2_marks_divergence_and_compares_with_the_bound(smoke_suite):
    _, analyses = smoke_suite
    seeds = smoke_configs()["E2"].seeds
    assert len(seeds) == 3
    for seed in seeds:
        rows = {r["lr"]: r for r in analyses["E2"]["rows"] if r["seed"] == seed}
        assert rows[50.0]["status"] == "diverged" and "frobenius" not in rows[50.0]
        for lr in (0.05, 0.1):
            row = rows[lr]
            assert row["status"] == "converged" and row["loss"] <= 1e-2
            assert row["bound"] == pytest.approx(1 / (lr * math.sqrt(row["mu"] / 4)))
            assert row["lambda_max"] <= row["frobenius"] + 3 * row["frobenius_stderr"]
            assert 0 <= row["mu_min"] <= row["mu"]
    converged = [r for r in analyses["E2"]["rows"] if "frobenius" in r]
    assert analyses["E2"]["fraction_below"] == sum(r["ratio"] <= 1 for r in converged) / len(converged)
    # The seeds are separate initialisations: their minima differ.
    assert len({r["frobenius"] for r in converged if r["lr"] == 0.05}) == 3
    for check in analyses["E2"]["checks"]:
        assert check["detail"].startswith(f"{check['seeds_passed']}/3 seeds. seed 0: ")


def test_e2_spread_over_seeds_is_the_mean_and_std_of_each_grid_point(smoke_suite):
    _, analyses = smoke_suite
    rows = analyses["E2"]["rows"]
    for entry in analyses["E2"]["spread"]:
        group = [r for r in rows if (r["lr"], r["batch_size"]) == (entry["lr"], entry["batch_size"])]
        values = [r["frobenius"] for r in group if "frobenius" in r]
        assert entry["seeds"] == 3 and entry["converged"] == len(values)
        assert entry["diverged"] == sum(r["status"] == "diverged" for r in group)
        if values:
            assert entry["frobenius_mean"] == pytest.approx(sum(values) / len(values), rel=1e-12)
            mean = entry["frobenius_mean"]
            variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
            assert entry["frobenius_std"] == pytest.approx(math.sqrt(variance), rel=1e-9)


def test_e3_runs_both_sweeps_for_every_arm_at_the_scanned_lr(smoke_suite):
    _, analyses = smoke_suite
    analysis, config = analyses["E3"], smoke_configs()["E3"]
    rows = analysis["rows"]
    points = {(r["sweep"], r["optimizer"], r["width"], r["n"]) for r in rows}
    assert points == {
        (s, o, w, n)
        for o in ("SGD B=2", "GD")
        for s, w, n in (("width", 4, 40), ("width", 8, 40), ("n", 8, 20))
    }
    # The base point is one run shared by both sweeps.
    assert len({r["run_id"] for r in rows}) == 6
    scan = analysis["scan"]
    reference = [r["lambda_max"] for r in scan["rows"] if r["width"] == config.scan_width]
    assert scan["reference_lambda_max"] == reference[0]
    assert analysis["lr"] == pytest.approx(2 / (config.edge_fraction * reference[0]))
    assert analysis["gd_limit"] == pytest.approx(2 / analysis["lr"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_e4_escape_curves_and_rates(smoke_suite, seed):
    _, analyses = smoke_suite
    config = analyses["E4"]["config"]
    assert config["seeds"] == [0, 1, 2]
    analysis = analyses["E4"]["seeds"][seed]
    minimum = analysis["minimum"]
    assert analysis["seed"] == seed and minimum["train"]["status"] == "converged"
    # The SGD learning rate was chosen so that eta^2 p_B mu ||H||_F^2 is the configured factor.
    assert minimum["predicted_rate"] == pytest.approx(math.log(config["escape_factor"]), rel=1e-6)
    assert len(analysis["curves"]) == config["repeats"]
    assert all(len(curve) == config["escape_steps"] + 1 for curve in analysis["curves"])
    assert len(minimum["linearized_loss"]) == config["escape_steps"] + 1
    from reference import jackknife_stderr, log_mean_slope  # the fit redone from its definition

    fit = analysis["measured"]
    window = (fit["fit_end"], fit["fit_start"])
    assert fit["fitted_steps"] == fit["fit_end"] - fit["fit_start"] >= 2
    assert fit["rate"] == pytest.approx(log_mean_slope(analysis["curves"], *window), rel=1e-9)
    # A bootstrap and a jackknife standard error agree up to sqrt((R-1)/R) and resampling noise.
    jackknife = jackknife_stderr(analysis["curves"], *window)
    assert jackknife / 3 <= fit["stderr"] <= 2 * jackknife


def test_e4_seeds_are_independent_replicates_and_their_spread_is_reported(smoke_suite):
    root, analyses = smoke_suite
    analysis = analyses["E4"]
    minima = [seed["minimum"] for seed in analysis["seeds"]]
    assert len({m["curvature"]["frobenius"] for m in minima}) == 3  # three initialisations, three minima
    escape_seeds = {
        read_json(folder / "config.json")["train"]["seed"] for folder in (root / "E4").glob("sgd-s*")
    }
    assert len(escape_seeds) == 3 * analysis["config"]["repeats"]  # no sampling stream shared
    ratios = [s["measured"]["rate"] / s["minimum"]["exact_rate"] for s in analysis["seeds"]]
    spread = analysis["spread"]["measured_over_exact"]
    assert spread["mean"] == pytest.approx(sum(ratios) / 3, rel=1e-12)
    assert (spread["min"], spread["max"]) == (min(ratios), max(ratios))
    for index, check in enumerate(analysis["checks"]):
        per_seed = [s["checks"][index]["holds"] for s in analysis["seeds"]]
        assert check["seeds_passed"] == sum(v is True for v in per_seed)
        assert check["detail"].startswith(f"{check['seeds_passed']}/3 seeds")


def test_e5_has_every_criterion_and_the_empirical_threshold(smoke_suite):
    _, analyses = smoke_suite
    rows = analyses["E5"]["rows"]
    assert sorted(row["seed"] for row in rows) == [0, 1, 2]  # one GD minimum per seed
    assert len({row["exact"] for row in rows}) == 3  # three initialisations, three minima
    ordered = [
        all(
            row["exact"] <= row[c] * (1 + 1e-6)
            for c in ("gd", "mulayoff15", "mulayoff16", "mulayoff24", "frobenius")
        )
        for row in rows
    ]
    for row in rows:
        assert set(CRITERIA) <= set(row) and row["empirical"] > 0
    ordering = analyses["E5"]["checks"][0]
    assert ordering["holds"] == all(ordered)
    assert ordering["detail"].startswith(f"{sum(ordered)}/3 seeds. seed 0: 1/1 cases")


# ------------------------------------------------------------------------------------- verdicts follow the data
def test_e1_checks_count_seeds_and_one_seed_against_the_claim_fails_its_check(smoke_suite):
    root, _ = smoke_suite
    config = dataclasses.replace(smoke_configs()["E1"], seeds=(0, 1, 2))
    finals = [read_json(folder / "final.json") for folder in run_folders(root, "E1")]

    def as_seed(record, seed):
        copied = copy.deepcopy(record)
        copied["config"]["train"]["seed"] = seed
        return copied

    def seeds_of(kind, corrupt=None):
        records = [r for r in finals if bool(r["config"].get("multiclass")) == kind]
        copies = [as_seed(r, seed) for seed in (0, 1, 2) for r in records]
        for record in copies:
            if corrupt is not None and record["config"]["train"]["seed"] == 1:
                corrupt(record)
        return copies

    same = e1_alignment.analyse(seeds_of(False), config, seeds_of(True))
    reference = e1_alignment.analyse(
        [r for r in finals if not r["config"].get("multiclass")],
        smoke_configs()["E1"],
        [r for r in finals if r["config"].get("multiclass")],
    )
    assert [c["holds"] for c in same["checks"]] == [c["holds"] for c in reference["checks"]]
    assert all(c["detail"].startswith(f"{c['seeds_passed']}/3 seeds") for c in same["checks"])
    assert {r["seed"] for r in same["rows"]} == {0, 1, 2} and len(same["multiclass_rows"]) == 3

    def low_mu(record):
        record["mu_curve"][1]["mu"] = 1e-3

    family = e1_alignment.analyse(seeds_of(False, low_mu), config, seeds_of(True))["checks"][0]
    assert family["holds"] is False and family["seeds_passed"] == (
        2 if reference["checks"][0]["holds"] else 0
    )
    assert "seed 1: min mu per family: linear: 0.001" in family["detail"]

    def low_c_mu(record):
        for point in record["mu_curve"]:
            point["mu"], point["c_mu"] = 1e-3, 1e-2

    arm = e1_alignment.analyse(seeds_of(False), config, seeds_of(True, low_c_mu))["checks"][1]
    assert arm["holds"] is False and "seed 1: min C mu: " in arm["detail"]


def test_verdicts_turn_when_the_data_contradicts_the_claim(smoke_suite):
    root, analyses = smoke_suite
    configs = smoke_configs()

    def records(name):
        return [read_json(folder / "final.json") for folder in run_folders(root, name)]

    e1 = records("E1")
    e1[0]["mu_curve"][1]["mu"] = 1e-3
    assert e1_alignment.analyse(e1, configs["E1"])["holds"] is False

    e2 = [r for r in records("E2") if "curvature" in r]
    (corrupted,) = [r for r in e2 if r["config"]["train"]["seed"] == 1 and r["config"]["train"]["lr"] == 0.05]
    corrupted["curvature"]["frobenius"] *= 100
    bound_check = e2_frobenius_bound.analyse(e2, configs["E2"])["checks"][0]
    assert bound_check["holds"] is False and bound_check["seeds_passed"] == 2

    e3 = [
        {
            **read_json(root / "E3" / row["run_id"] / "final.json"),
            **{k: row[k] for k in ("sweep", "optimizer", "batch_size", "width", "n", "seed")},
        }
        for row in analyses["E3"]["rows"]
    ]
    for record in e3:
        if record["optimizer"] == "GD" and "curvature" in record:
            record["curvature"]["lambda_max"] = 1e6
    assert e3_size.analyse(e3, configs["E3"], analyses["E3"]["scan"])["checks"][0]["holds"] is False

    e4 = copy.deepcopy(analyses["E4"])
    minima = {seed["seed"]: seed["minimum"] for seed in e4["seeds"]}
    # Every seed's escape curves flat at its minimum's loss: no escape on 0/3 seeds.
    flat = {
        seed["seed"]: [
            {
                "curve": [[step, seed["minimum"]["curvature"]["loss"]] for step, _ in curve],
                "escape": {"status": "max_steps"},
            }
            for curve in seed["curves"]
        ]
        for seed in e4["seeds"]
    }
    exact_check = e4_escape.analyse(minima, flat, configs["E4"])["checks"][0]
    assert exact_check["holds"] is False and exact_check["detail"].startswith("0/3 seeds")

    e5 = records("E5")
    (corrupted,) = [r for r in e5 if r["config"]["train"]["seed"] == 2]
    corrupted["criteria"][0]["thresholds"]["exact"] = 10 * corrupted["criteria"][0]["thresholds"]["gd"]
    ordering = e5_criteria.analyse(e5, configs["E5"])["checks"][0]
    assert ordering["holds"] is False and "seed 2: 0/1 cases" in ordering["detail"]
    assert ordering["seeds_passed"] == sum(
        all(
            r["criteria"][0]["thresholds"]["exact"] <= r["criteria"][0]["thresholds"][c] * (1 + 1e-6)
            for c in ("gd", "mulayoff15", "mulayoff16", "mulayoff24", "frobenius")
        )
        for r in e5
    )


# ------------------------------------------------------------------------------------- resume
def test_a_killed_suite_resumes_without_redoing_finished_runs(smoke_suite, tmp_path, monkeypatch):
    source, _ = smoke_suite
    shutil.copytree(source / "E2", tmp_path / "E2")
    finals = sorted((tmp_path / "E2").glob("*/final.json"))
    killed = finals[0]
    killed.unlink()  # the suite was killed after this run's checkpoint, before its final.json
    stamps = {path: path.stat().st_mtime_ns for path in finals[1:]}
    trained = []
    real_train = run_spec.train
    monkeypatch.setattr(
        run_spec, "train", lambda *a, **k: trained.append(k["checkpoint_dir"]) or real_train(*a, **k)
    )

    e2_frobenius_bound.run(smoke_configs()["E2"], tmp_path)

    assert trained == [killed.parent]
    assert killed.exists() and all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())
    # The trainer resumed the finished checkpoint instead of training again.
    final = read_json(killed)
    assert final["train"]["resumed_from"] == final["train"]["steps"]


def test_e4_killed_while_settling_resumes_both_phases(smoke_suite, tmp_path):
    source, _ = smoke_suite
    shutil.copytree(source / "E4", tmp_path / "E4")
    (tmp_path / "E4" / "analysis.json").unlink()
    (settler,) = (tmp_path / "E4").glob("sgd-s1-r0-*")
    expected = read_json(settler / "final.json")
    (settler / "final.json").unlink()  # killed after the settling phase's checkpoint

    analysis = e4_escape.run(smoke_configs()["E4"], tmp_path)

    resumed = read_json(settler / "final.json")
    assert resumed["escape"]["steps"] == expected["escape"]["steps"]
    assert resumed.get("settle", {}).get("steps") == expected.get("settle", {}).get("steps")
    assert analysis["holds"] == read_json(source / "E4" / "analysis.json")["holds"]


# ------------------------------------------------------------------------------------- configs
def test_overrides_parse_json_and_refuse_unknown_fields():
    configs = configure(
        "quick", only=["E2", "E3"], overrides=["E2.lrs=[0.1, 0.2]", "data.n=300", "E3.model.kwargs.width=32"]
    )
    assert configs["E2"].lrs == (0.1, 0.2)
    assert configs["E2"].data.n == configs["E3"].data.n == 300
    assert configs["E3"].model.kwargs["width"] == 32
    with pytest.raises(ValueError, match="no field 'lr'"):
        configure("quick", only=["E2"], overrides=["E2.lr=0.1"])
    with pytest.raises(ValueError, match="unknown experiment E9"):
        configure("quick", only=["E9"])
    with pytest.raises(ValueError, match="takes a value of type int"):
        override(configs["E2"], "max_steps", '"many"')


# ------------------------------------------------------------------------------------- run identity
class _Stop(Exception):
    pass


def first_run_ids(module, config, monkeypatch):
    """The run ids of a recipe's first stages (E4: the GD run and the escapes), without running them."""
    ids = []

    def fake_run_stage(tasks, executor=None, progress=None):
        ids.extend(task.path.name for task in tasks)
        if module is e4_escape and len(ids) == len(config.seeds):
            return [{"train": {"status": "converged"}, "sgd_lr": 0.1, "folder": "E4/gd"}] * len(ids)
        raise _Stop

    monkeypatch.setattr(module, "run_stage", fake_run_stage)
    with pytest.raises(_Stop):
        module.run(config, "unused")
    return ids


@pytest.mark.parametrize(
    ("module", "config"),
    [
        (e2_frobenius_bound, dataclasses.replace(smoke_configs()["E2"], start_lr=0.05)),
        (e4_escape, smoke_configs()["E4"]),
        (e1_alignment, dataclasses.replace(smoke_configs()["E1"], seeds=(0, 1, 2))),
        (e5_criteria, smoke_configs()["E5"]),
    ],
)
def test_every_seed_is_in_one_stage_so_workers_train_seeds_side_by_side(
    module, config, monkeypatch, tmp_path
):
    stages = []

    def fake_run_stage(tasks, executor=None, progress=None):
        stages.append([task.label for task in tasks])
        return [{"train": {"status": "converged"}, "sgd_lr": 0.1, "folder": "E4/gd"} for _ in tasks]

    monkeypatch.setattr(module, "run_stage", fake_run_stage)
    monkeypatch.setattr(module, "analyse", lambda *args: {})
    monkeypatch.setattr(module, "save_analysis", lambda *args: {})
    module.run(config, tmp_path)
    if module in (e1_alignment, e5_criteria):  # one stage: every seed's runs
        (only,) = stages
        per_seed = len(only) // 3
        assert (
            sorted(label.rsplit("-s", 1)[1] for label in only)
            == ["0"] * per_seed + ["1"] * per_seed + ["2"] * per_seed
        )
        return
    first, second = stages
    assert sorted(label.rsplit("-s", 1)[1] for label in first) == ["0", "1", "2"]
    per_seed = len(config.lrs) * len(config.batch_sizes) if module is e2_frobenius_bound else config.repeats
    assert len(second) == 3 * per_seed and len(set(second)) == len(second)
    assert {label.split("-s")[-1].split("-")[0] for label in second} == {"0", "1", "2"}


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("E1", "alignment", '"stochastic"'),
        ("E1", "num_probes", "7"),
        ("E4", "linearized_chains", "50"),
        ("E4", "escape_steps", "9"),
        ("E4", "settle_loss_goal", "1e-4"),
        ("E4", "settle_steps", "700"),
        ("E4", "measure.num_probes", "9"),
    ],
)
def test_every_setting_that_changes_a_number_changes_the_run_id(monkeypatch, name, key, value):
    module = EXPERIMENTS[name]
    config = smoke_configs()[name]
    before = first_run_ids(module, config, monkeypatch)
    after = first_run_ids(module, override(config, key, value), monkeypatch)
    assert before != after  # row 122: a changed setting re-runs instead of reusing the old result


def test_run_ids_include_the_result_format_version(monkeypatch):
    config = {"train": {"lr": 0.1}}
    before = runs.run_id("x", config)
    monkeypatch.setattr(runs, "RESULT_FORMAT_VERSION", runs.RESULT_FORMAT_VERSION + 1)
    assert runs.run_id("x", config) != before


def test_a_moved_e4_suite_resumes_from_another_working_folder(smoke_suite, tmp_path, monkeypatch):
    source, _ = smoke_suite
    shutil.copytree(source / "E4", tmp_path / "moved" / "E4")
    (gd,) = (tmp_path / "moved" / "E4").glob("gd-s2-*")
    (escape,) = (tmp_path / "moved" / "E4").glob("sgd-s2-r1-*")
    assert read_json(gd / "final.json")["folder"] == f"E4/{gd.name}"  # rows 117, 118: relative to the suite
    assert read_json(escape / "config.json")["train"]["init_from"] == f"E4/{gd.name}"
    expected = read_json(escape / "final.json")
    (escape / "final.json").unlink()
    (escape / "checkpoint.pt").unlink()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    e4_escape.run(smoke_configs()["E4"], "../moved")
    assert read_json(escape / "final.json")["curve"] == expected["curve"]


def test_a_refused_override_leaves_the_suite_config_and_report_alone(smoke_suite, tmp_path):
    source, _ = smoke_suite
    shutil.copytree(source, tmp_path / "suite")
    suite = tmp_path / "suite"
    before = (suite / "config.json").read_text()
    with pytest.raises(InputError, match="lr must be"):
        reproduce(suite, scale="smoke", only=["E2"], overrides=["E2.lrs=[-1]"])  # row 120
    assert (suite / "config.json").read_text() == before
    assert not (suite / ".lock").exists()


def test_the_reported_scale_is_the_scale_of_the_results(smoke_suite, tmp_path):
    source, analyses = smoke_suite
    assert all(analysis["scale"] == "smoke" for analysis in analyses.values())
    shutil.copytree(source, tmp_path / "suite")
    suite = read_json(tmp_path / "suite" / "config.json")
    suite["experiments"]["E2"]["scale"] = "quick"  # as a killed quick run's config once said (row 121)
    write_json_atomic(tmp_path / "suite" / "config.json", suite)
    markdown = render_markdown(build_blocks(tmp_path / "suite"))
    assert "(scale: quick)" not in markdown and "(scale: smoke)" in markdown


def test_the_trainers_progress_reaches_the_suites_callback(tmp_path):
    calls = []
    reproduce(
        tmp_path,
        scale="smoke",
        only=["E2"],
        overrides=["E2.lrs=[0.1]"],
        progress=lambda *call: calls.append(call),
    )
    training = [
        (label, done, total) for label, done, total in calls if label.startswith("training E2/lr0.1-B4-s0-")
    ]
    assert len(training) > 2 and training[0][1] == 0 and all(total == 600 for _, _, total in training)
    assert [done for _, done, _ in training] == sorted(done for _, done, _ in training)


def test_a_resumed_suite_removes_the_temporaries_of_killed_writes(smoke_suite, tmp_path):
    source, _ = smoke_suite
    shutil.copytree(source, tmp_path / "suite")
    suite = tmp_path / "suite"
    torn = [
        suite / ".config.json.k1.tmp",
        suite / "E2" / ".analysis.json.k2.tmp",
        suite / "figures" / ".E2.png.k3.tmp",
    ]
    (run,) = [p for p in (suite / "E2").iterdir() if p.name.startswith("lr0.1-B4-s0-")]
    (run / "final.json").unlink()
    torn += [run / ".final.json.k4.tmp", run / ".checkpoint.pt.k5.tmp", run / ".metrics.jsonl.k6.tmp"]
    for path in torn:
        path.write_text("torn")
    reproduce(suite, scale="smoke", only=["E2"])  # row 114
    assert not any(path.exists() for path in torn) and (run / "final.json").exists()
