"""The cross-version picture: the champion's held-out score and KL to SFT after each version, from the records."""

import json

import pytest

from align.evaluation.progress import plot_progress, version_points


def write_version(root, n, policies, decision):
    vdir = root / f"v{n}"
    vdir.mkdir(parents=True)
    record = {"version": f"v{n}", "evaluation": {"policies": policies}, "decision": decision}
    (vdir / "version.json").write_text(json.dumps(record))


def test_the_champion_is_followed_across_versions(tmp_path):
    # v1: nothing beats SFT (gold 1.5), SFT becomes the first champion; v2: DPO (gold 1.9, KL to SFT 0.4) wins
    # against it; v3: PPO (2.0) loses against the v2 DPO, measured again there at 1.85 as the baseline
    sft = {"version": "v1", "stage": "sft"}
    write_version(tmp_path, 1, {"dpo": {"gold_score_policy": 1.55, "gold_score_reference": 1.5, "kl_to_sft": 0.1}},
                  {"promote": None, "changed": True, "champion": sft})
    dpo2 = {"version": "v2", "stage": "dpo"}
    write_version(tmp_path, 2, {"dpo": {"gold_score_policy": 1.9, "gold_score_reference": 1.52, "kl_to_sft": 0.4},
                                "ppo": {"gold_score_policy": 1.6, "gold_score_reference": 1.52, "kl_to_sft": 0.2}},
                  {"promote": "dpo", "changed": True, "champion": dpo2})
    write_version(tmp_path, 3, {"ppo": {"gold_score_policy": 2.0, "gold_score_reference": 1.85, "kl_to_sft": 0.9}},
                  {"promote": None, "changed": False, "champion": dpo2})
    (tmp_path / "v4").mkdir()  # a version still running: no record yet, left out
    points = version_points(tmp_path)
    assert [p["version"] for p in points] == ["v1", "v2", "v3"] and {p["judge"] for p in points} == {"gold"}
    assert [p["champion"]["score"] for p in points] == [1.5, 1.9, 1.85]
    assert [p["champion"]["kl"] for p in points] == [0.0, 0.4, 0.4]
    assert [p["champion"]["stage"] for p in points] == ["v1 sft", "v2 dpo", "v2 dpo"]
    assert [(c["stage"], c["promoted"]) for c in points[1]["candidates"]] == [("dpo", True), ("ppo", False)]
    assert plot_progress(points, tmp_path / "progress.png")
    assert (tmp_path / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_gold_answers_the_reward_model_score_is_followed(tmp_path):
    write_version(tmp_path, 1, {"dpo": {"rm_score_policy": 0.7, "rm_score_reference": 0.2, "kl_to_reference": 0.3}},
                  {"promote": "dpo", "changed": True, "champion": {"version": "v1", "stage": "dpo"}})
    (point,) = version_points(tmp_path)
    assert point["judge"] == "rm" and point["champion"]["score"] == pytest.approx(0.7)
    assert point["champion"]["kl"] == pytest.approx(0.3)  # no kl_to_sft recorded: the KL to its reference
    assert not plot_progress([], tmp_path / "none.png") and not (tmp_path / "none.png").exists()
