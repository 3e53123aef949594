"""The whole loop on a tiny model: versions, skipping unchanged stages, lineage, failure and resume, report."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EVAL_NUMBERS, pair_rows, write_jsonl

from align.cli.main import main
from align.loop import pipeline
from align.loop.pipeline import load_pipeline, run, stage_config
from align.loop.versions import Home
from align.runtime.errors import ConfigError

PROMPTS = Path(__file__).resolve().parent.parent / "reward_data" / "prefs" / "prompts.jsonl"


def tiny_overrides(tmp: Path, tiny: Path, prefs: Path, prefs_eval: Path, sft: Path) -> list[str]:
    return [f"runs_dir={tmp / 'runs'}", "name=t", f"model.name_or_path={tiny}",
            f"data.sft={sft}", "data.sft_eval=", f"data.preferences={prefs}", f"data.preferences_eval={prefs_eval}",
            f"data.eval_prompts={PROMPTS}", "evaluate.limit=3", "evaluate.max_new_tokens=4",
            "sft.training.max_steps=2", "sft.training.batch_size=2", "sft.lora.r=4", "sft.lora.alpha=8",
            "sft.samples=0", "reward.training.max_steps=2", "reward.training.batch_size=2",
            "dpo.training.max_steps=2", "dpo.training.batch_size=2", "dpo.data.eval=",
            "ppo.training.max_steps=1", "ppo.rollout.batch_size=2", "ppo.rollout.max_new_tokens=4",
            "ppo.training.batch_size=2", "grpo.enabled=true", "grpo.rewards=[format]", "grpo.training.max_steps=1",
            "grpo.rollout.batch_size=2", "grpo.grpo.num_generations=2", "grpo.rollout.max_new_tokens=4",
            "grpo.training.batch_size=4", "merge.dtype=fp32"]


def loop_files(tmp: Path) -> tuple[Path, Path, Path]:
    """The tiny loop's preference, held-out preference and SFT files."""
    prefs = write_jsonl(tmp / "prefs.jsonl", pair_rows([(a, b) for a in range(2, 8) for b in (3, 7)]))
    prefs_eval = write_jsonl(tmp / "prefs-eval.jsonl", pair_rows(EVAL_NUMBERS[:4], start=1))
    sft = write_jsonl(tmp / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                          for r in pair_rows([(2, 3), (4, 5), (6, 7), (8, 9)])])
    return prefs, prefs_eval, sft


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny_model_dir):
    """Version 1 of a tiny pipeline (made once for the module); the tests below that change it work on a copy."""
    tmp = tmp_path_factory.mktemp("loop")
    prefs, prefs_eval, sft = loop_files(tmp)
    overrides = tiny_overrides(tmp, tiny_model_dir, prefs, prefs_eval, sft)
    record = run(load_pipeline(None, overrides))
    return {"tmp": tmp, "overrides": overrides, "record": record, "home": Home(tmp / "runs" / "t"), "prefs": prefs}


def test_first_version_trains_every_stage_evaluates_promotes_merges_and_reports(loop):
    record, home = loop["record"], loop["home"]
    assert record["version"] == "v1" and record["status"] == "done"
    assert set(record["stages"]) == {"sft", "reward", "dpo", "ppo", "grpo"}
    for stage, entry in record["stages"].items():
        assert entry["made_in"] == "v1" and Path(entry["path"]) == home.root / "v1" / stage
        assert (Path(entry["path"]) / "adapter_model.safetensors").is_file()
    # lineage: reward, DPO and PPO start from this SFT; PPO is scored by this reward model
    sft, rm = str(home.root / "v1" / "sft"), str(home.root / "v1" / "reward")
    assert record["stages"]["dpo"]["parents"] == {"sft": sft}
    assert record["stages"]["ppo"]["parents"] == {"sft": sft, "reward": rm}
    assert record["stages"]["grpo"]["parents"] == {"sft": sft}  # its rewards name no reward model
    ev = record["evaluation"]
    assert ev["baseline"] == sft and set(ev["policies"]) == {"dpo", "ppo", "grpo"}
    for name in ("dpo", "ppo", "grpo"):
        full = json.loads(Path(ev["files"][name]).read_text())
        assert full["n_prompts"] == 3 and 0 <= full["gold_win_rate"] <= 1 and 0 <= full["rm_win_rate"] <= 1
        assert ev["policies"][name]["kl_to_reference"] == full["kl_estimate"]  # baseline is the reference here
        assert full["kl_to_sft"] == full["kl_to_reference"]  # held to SFT: the same distance
    # a champion exists after the first round (a winner, or SFT), and a merged copy of it
    champion = record["decision"]["champion"]
    assert champion["version"] == "v1" and champion["stage"] in {"sft", "dpo", "ppo", "grpo"}
    # three candidates share the test's 0.05: each is held to 0.05 / 3
    checks = record["decision"]["checks"]
    assert set(checks) == {"dpo", "ppo", "grpo"} and all(c["alpha"] == pytest.approx(0.05 / 3) for c in checks.values())
    assert record["merged"]["path"] == str(home.root / "v1" / "merged")
    assert (home.root / "v1" / "merged" / "model.safetensors").is_file()


def test_report_exists_and_every_image_it_shows_exists(loop):
    report = Path(loop["record"]["report"])
    text = report.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"training.png", "reward_kl.png", "lengths.png", "progress.png"} <= set(images)
    for image in images:
        data = (report.parent / image).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "## Decision" in text and "| gold-judge win-rate |" in text and "**Prompt:**" in text
    # how sure each win-rate is: counts with a sign test, and an interval, for every policy judged by gold
    assert re.search(r"\|\s+wins / ties / losses \(sign test p\) \| — \| \d+ / \d+ / \d+ \(p = [0-9.e-]+\) \|", text)
    assert re.search(r"\|\s+95% interval \| — \| \d+\.\d% – \d+\.\d% \|", text)


def test_a_second_run_with_unchanged_inputs_trains_nothing(loop, monkeypatch, capsys):
    home = loop["home"]
    trained = []
    monkeypatch.setattr(pipeline, "_stage_runner", lambda stage: trained.append(stage))
    versions = home.versions()
    record = run(load_pipeline(None, loop["overrides"]))
    assert record.get("nothing_to_do") and trained == [] and home.versions() == versions
    assert main(["run", *loop["overrides"]]) == 0
    assert "nothing to do" in capsys.readouterr().out and trained == []


def test_new_preference_data_retrains_all_but_sft_then_a_failed_stage_resumes(loop, monkeypatch):
    home = loop["home"]
    versions_before = home.versions()
    more = write_jsonl(loop["tmp"] / "new-pairs.jsonl", pair_rows([(9, 4), (10, 6), (11, 2), (12, 5)], start=3))
    overrides = [*loop["overrides"], f"data.preferences={loop['prefs']},{more}"]
    real = pipeline._stage_runner
    calls = []

    def failing_dpo(stage):
        calls.append(stage)
        if stage == "dpo":
            def boom(cfg):
                raise RuntimeError("injected DPO failure")
            return boom
        return real(stage)

    monkeypatch.setattr(pipeline, "_stage_runner", failing_dpo)
    with pytest.raises(RuntimeError, match="injected DPO failure"):
        run(load_pipeline(None, overrides))
    version = f"v{len(versions_before) + 1}"
    failed = home.read(version)
    assert failed["status"] == "failed" and failed["error"]["step"] == "dpo"
    assert calls == ["reward", "dpo"]  # SFT's inputs did not change: reused, not trained
    assert failed["stages"]["sft"]["made_in"] == "v1" and failed["stages"]["reward"]["made_in"] == version

    calls.clear()
    monkeypatch.setattr(pipeline, "_stage_runner", lambda stage: (calls.append(stage), real(stage))[1])
    record = run(load_pipeline(None, overrides))
    assert record["version"] == version and record["status"] == "done"  # the same version, continued
    assert calls == ["dpo", "ppo", "grpo"]  # the reward model finished before the failure: not trained again
    assert record["stages"]["sft"]["made_in"] == "v1"
    assert {s: e["made_in"] for s, e in record["stages"].items() if s != "sft"} == dict.fromkeys(
        ["reward", "dpo", "ppo", "grpo"], version)
    assert record["stages"]["reward"]["path"] == str(home.root / version / "reward")
    # judged against the champion, with a decision written down either way
    assert record["evaluation"]["baseline"] == home.read("v1")["decision"]["champion"]["path"]
    assert record["decision"]["reason"] and "changed" in record["decision"]
    assert record["evaluation"]["policies"]["dpo"]["kl_to_reference"] is not None


def test_from_forces_a_step_and_everything_after_it(loop, monkeypatch):
    home = loop["home"]
    calls = []

    def stop(stage):
        calls.append(stage)

        def fail(cfg):
            raise RuntimeError("stop here")
        return fail

    monkeypatch.setattr(pipeline, "_stage_runner", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        run(load_pipeline(None, loop["overrides"]), start="ppo")
    assert calls == ["ppo"]  # sft, reward and dpo unchanged and before --from: reused
    latest = home.latest()
    assert latest["status"] == "failed" and latest["error"]["step"] == "ppo"
    shutil.rmtree(home.root / latest["version"])  # leave the module's pipeline as it was


def test_an_evaluation_without_the_reward_judge_and_with_the_kl_on_fewer_prompts(loop, tmp_path):
    """evaluate.reward_judge=false: the gold judge decides alone (no rm_ keys); evaluate.kl_limit: the KL from the
    first N prompts. v1 of a copy of the module's pipeline (other tests may have added versions) evaluated again."""
    from align.evaluation.report import write_report
    from align.loop.steps import evaluate_step

    runs = tmp_path / "runs"
    shutil.copytree(loop["tmp"] / "runs", runs)
    overrides = [o for o in loop["overrides"] if not o.startswith("runs_dir=")]
    overrides += [f"runs_dir={runs}", "evaluate.reward_judge=false", "evaluate.kl_limit=2"]
    home = Home(runs / "t")
    record = home.read("v1")
    evaluate_step(load_pipeline(None, overrides), home, record, force=True)
    files = record["evaluation"]["files"]
    assert files
    for name, path in files.items():
        full = json.loads(Path(path).read_text())
        assert full["gold_n"] == 3 and not any(k.startswith("rm_") for k in full), name
        assert full["n_prompts"] == 3 and full["kl_prompts"] == 2
    assert record["decision"]["reason"]
    text = write_report(home.root, record).read_text()
    assert "KL sampled at temperature 1 on the first 2)" in text and "| gold-judge win-rate |" in text
    assert "reward-model win-rate" not in text  # a judge that did not judge gets no row of dashes


def test_pipeline_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="dpo.betta"):
        load_pipeline(None, ["dpo.betta=0.1"])
    with pytest.raises(ConfigError, match="ppo's rewards name reward_model, the reward stage's model"):
        load_pipeline(None, ["reward.enabled=false"])
    with pytest.raises(ConfigError, match="grpo's rewards name reward_model"):
        load_pipeline(None, ["ppo.enabled=false", "reward.enabled=false", "grpo.rewards=[reward_model]"])
    # PPO and GRPO on the gold judge need no reward stage; GRPO runs only when the pipeline names it
    p = load_pipeline(None, ["reward.enabled=false", "ppo.rewards=[gold]", "grpo.rewards=[gold, format]"])
    assert p.enabled() == ["sft", "dpo", "ppo", "grpo"] and load_pipeline(None).enabled()[-1] == "ppo"
    with pytest.raises(ConfigError, match="sft.config"):
        load_pipeline(None, ["sft.config=nowhere.yaml"])
    with pytest.raises(ConfigError, match="promotion.margin"):
        load_pipeline(None, ["promotion.margin=0.7"])


def test_stage_config_takes_data_and_parents_from_the_pipeline(tmp_path):
    p = load_pipeline(Path(__file__).resolve().parent.parent / "recipes" / "configs" / "pipeline.yaml",
                      [f"runs_dir={tmp_path}", "data.preferences=a.jsonl,b.jsonl", "data.preferences_eval=c.jsonl"])
    cfg = stage_config(p, "ppo", "v3", {"sft": Path("x/sft"), "reward": Path("y/reward")})
    assert (cfg.run, cfg.runs_dir) == ("v3", str(tmp_path / "demo"))
    assert (cfg.init_from_sft, cfg.reward_model, cfg.eval_prompts) == ("x/sft", "y/reward", None)
    assert cfg.data.train == "a.jsonl,b.jsonl" and cfg.training.max_steps == 2 and cfg.ppo.epochs == 1
    dpo = stage_config(p, "dpo", "v3", {"sft": Path("x/sft")})
    assert dpo.data.eval is None and dpo.loss == "ipo"  # the pipeline file's stage keys win over the data default


def test_runs_lists_versions_and_shows_one_with_its_lineage(loop, capsys):
    runs_dir = str(loop["tmp"] / "runs")
    assert main(["runs", "--runs-dir", runs_dir]) == 0
    out = capsys.readouterr().out
    v1 = loop["record"]
    assert "champion:" in out and re.search(r"v1\s+done", out)
    assert f"{v1['evaluation']['reward_model']['eval_accuracy']:.1%}" in out
    assert "GRPO gold" in out and f"{v1['evaluation']['policies']['grpo']['gold_win_rate']:.1%}" in out
    assert main(["runs", "show", "v1", "--runs-dir", runs_dir, "--name", "t"]) == 0
    out = capsys.readouterr().out
    assert "lineage:" in out and f"sft ← {v1['stages']['sft']['path']}" in out
    g = v1["evaluation"]["policies"]["grpo"]  # each win-rate with its wins / ties / losses and sign test
    assert f"gold win-rate {g['gold_win_rate']:.1%} ({g['gold_wins']}/{g['gold_ties']}/{g['gold_losses']}, p = " in out
    assert "; length-controlled " in out
    assert f"report: {v1['report']}" in out
    assert main(["runs", "show", "v9", "--runs-dir", runs_dir]) == 2
    assert "no version 'v9' (versions: v1" in capsys.readouterr().err


def test_a_pipeline_directory_stands_for_its_champion(loop):
    from align.serving.trained import champion_or

    home = loop["home"]
    assert champion_or(home.root) == Path(home.champion()["path"])
    assert champion_or(home.root / "v1" / "sft") == home.root / "v1" / "sft"


def test_a_pipeline_directory_finds_its_champion_from_any_working_directory(tmp_path, monkeypatch):
    from align.serving.trained import champion_or

    root = tmp_path / "work" / "runs" / "demo"
    (root / "v2" / "dpo").mkdir(parents=True)
    # `align run` in tmp/work recorded the path relative to there
    (root / "champion.json").write_text(json.dumps({"version": "v2", "stage": "dpo", "path": "runs/demo/v2/dpo"}))
    monkeypatch.chdir(tmp_path)
    assert champion_or(root) == root / "v2" / "dpo"


def test_a_new_round_starts_from_the_champion_held_to_the_chosen_reference(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file

    from align.stages import dpo

    prefs = write_jsonl(tmp_path / "prefs.jsonl", pair_rows([(a, b) for a in range(2, 8) for b in (3, 7)]))
    prefs_eval = write_jsonl(tmp_path / "prefs-eval.jsonl", pair_rows(EVAL_NUMBERS[:4], start=1))
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                                    for r in pair_rows([(2, 3), (4, 5), (6, 7), (8, 9)])])
    overrides = [*tiny_overrides(tmp_path, tiny_model_dir, prefs, prefs_eval, sft_rows), "ppo.enabled=false",
                 "grpo.enabled=false"]
    v1 = run(load_pipeline(None, overrides))
    home = Home(tmp_path / "runs" / "t")
    champion = {"version": "v1", "stage": "dpo", **{k: v1["stages"]["dpo"][k] for k in ("path", "key")}}
    home.set_champion(champion)  # whatever v1 decided: the round below must build on a trained policy
    p = load_pipeline(None, overrides)
    start = pipeline.start_of(p, champion)
    # the starting policy is part of a policy stage's key, not of SFT's or the reward model's
    plain, from_champion = pipeline.plan_keys(p), pipeline.plan_keys(p, start)
    assert plain["sft"] == from_champion["sft"] and plain["reward"] == from_champion["reward"]
    assert plain["dpo"] != from_champion["dpo"]
    parents = {"sft": Path(v1["stages"]["sft"]["path"])}
    cfg = pipeline.stage_config(p, "dpo", "v9", parents, start)  # reference: sft (the default)
    assert (cfg.init_from, cfg.init_from_sft) == (champion["path"], v1["stages"]["sft"]["path"])
    cfg = pipeline.stage_config(load_pipeline(None, [*overrides, "reference=champion"]), "dpo", "v9", parents, start)
    assert (cfg.init_from, cfg.init_from_sft) == (None, champion["path"])
    assert pipeline.start_of(load_pipeline(None, [*overrides, "start_from=sft"]), champion) is None

    started = {}
    real_build = dpo.build_lora_model

    def spy(prep, *a, **k):
        model = real_build(prep, *a, **k)
        started.update({n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n})
        return model

    monkeypatch.setattr(dpo, "build_lora_model", spy)
    more = write_jsonl(tmp_path / "new-pairs.jsonl", pair_rows([(9, 4), (10, 6), (11, 2), (12, 5)], start=3))
    v2 = run(load_pipeline(None, [*overrides, f"data.preferences={prefs},{more}"]))
    assert v2["version"] == "v2" and v2["start"]["path"] == champion["path"]
    assert v2["stages"]["dpo"]["parents"]["start"] == champion["path"]  # the lineage says where it started
    # v2's DPO policy started from v1's DPO weights, tensor for tensor, and its reference is the SFT adapter
    saved = load_file(str(Path(champion["path"]) / "adapter_model.safetensors"))
    assert saved and len(started) == len(saved)
    for name, weight in saved.items():
        live = re.sub(r"\.(lora_[AB])\.weight$", r".\1.default.weight", name)
        assert torch.equal(started[live], weight), name
    manifest = json.loads((Path(v2["stages"]["dpo"]["path"]) / "manifest.json").read_text())
    assert manifest["parent"] == str(Path(v1["stages"]["sft"]["path"]).resolve())
    assert manifest["started_from"] == str(Path(champion["path"]).resolve())
    assert v2["stages"]["sft"]["made_in"] == "v1"  # SFT's inputs did not change
    # the same command again: nothing to do, whatever v2 decided about the champion
    assert run(load_pipeline(None, [*overrides, f"data.preferences={prefs},{more}"])).get("nothing_to_do")


def test_a_round_opens_with_pairs_sampled_from_the_champion(tmp_path, tiny_model_dir, monkeypatch):
    from align.loop import onpolicy

    prefs = write_jsonl(tmp_path / "prefs.jsonl", pair_rows([(a, b) for a in range(2, 8) for b in (3, 7)]))
    prefs_eval = write_jsonl(tmp_path / "prefs-eval.jsonl", pair_rows(EVAL_NUMBERS[:4], start=1))
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                                    for r in pair_rows([(2, 3), (4, 5), (6, 7), (8, 9)])])
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"prompt": f"What is {a} + 10?", "answer": a + 10}
                                                           for a in range(6)])
    overrides = [*tiny_overrides(tmp_path, tiny_model_dir, prefs, prefs_eval, sft_rows), "ppo.enabled=false",
                 "grpo.enabled=false", "pairs.enabled=true", f"pairs.prompts={questions}", "pairs.limit=3",
                 "pairs.n=2"]
    asked = []

    def fake(model, tokenizer, messages, sampling, *a, **k):  # the champion: right once, wrong once
        asked.append([m[-1]["content"] for m in messages])
        eos = tokenizer.eos_token_id
        return [[(f"The answer is {int(m[-1]['content'].split()[2]) + 10}.", [5, eos]), ("The answer is 0.", [5, eos])]
                for m in messages]

    monkeypatch.setattr(onpolicy, "sample_batch", fake)
    v1 = run(load_pipeline(None, overrides))
    assert "pairs" not in v1 and asked == []  # no champion before the first round: nothing to sample
    v2 = run(load_pipeline(None, overrides))  # the same command: a new round, opened by the champion's pairs
    assert v2["version"] == "v2" and v2["pairs"]["pairs"] == 3
    assert asked == [[f"What is {a} + 10?" for a in (0, 1, 2)]]
    pairs = [json.loads(line) for line in Path(v2["pairs"]["file"]).read_text().splitlines()]
    assert [r["chosen"] for r in pairs] == ["The answer is 10.", "The answer is 11.", "The answer is 12."]
    assert v2["stages"]["sft"]["made_in"] == "v1" and v2["stages"]["dpo"]["made_in"] == "v2"
    assert v2["config"]["data"]["preferences"] == f"{v2['pairs']['file']},{prefs}"
    v3 = run(load_pipeline(None, overrides))
    assert v3["version"] == "v3" and asked[1] == [f"What is {a} + 10?" for a in (3, 4, 5)]  # new questions
