"""Task samplers: the round-robin schedule, seeded draws identical across ranks and resumes,
and stop-and-go transitions on a scripted score sequence."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from vilbert_ds.tasks.sampler import PlateauController, SamplerConfig, StopAndGoConfig, build_sampler, eval_due

TASKS = ["vqa", "gqa", "refcoco", "nlvr2"]
SIZES = {"vqa": 4000, "gqa": 1000, "refcoco": 250, "nlvr2": 10}
LRS = {"vqa": 4e-5, "gqa": 4e-5, "refcoco": 2e-5, "nlvr2": 2e-5}


def test_round_robin_runs_every_task_in_order_with_lr_ratio_loss_scales():
    s = build_sampler(TASKS, SIZES, LRS, {"kind": "round_robin"})
    assert [s.tasks_at(step) for step in range(3)] == [TASKS] * 3
    assert s.loss_scales() == {"vqa": 2.0, "gqa": 2.0, "refcoco": 1.0, "nlvr2": 1.0}
    assert build_sampler(TASKS, SIZES, LRS, {"loss_scale": "none"}).loss_scales()["vqa"] == 1.0


def test_temperature_probabilities_and_empirical_frequencies():
    prop = build_sampler(TASKS, SIZES, LRS, {"kind": "proportional", "seed": 3})
    p = prop.probabilities(0)
    assert p["vqa"] == pytest.approx(4000 / 5260)
    uniform = build_sampler(TASKS, SIZES, LRS, {"kind": "temperature", "alpha": 0.0}).probabilities(0)
    assert all(v == pytest.approx(0.25) for v in uniform.values())
    half = build_sampler(TASKS, SIZES, LRS, {"kind": "temperature", "alpha": 0.5}).probabilities(0)
    assert half["vqa"] / half["refcoco"] == pytest.approx(4.0)  # sqrt(4000 / 250)
    draws = [t for step in range(4000) for t in prop.tasks_at(step)]
    assert draws.count("vqa") / len(draws) == pytest.approx(p["vqa"], abs=0.03)


def test_draws_are_a_pure_function_of_seed_and_step():
    a = build_sampler(TASKS, SIZES, LRS, {"kind": "temperature", "alpha": 0.5, "seed": 7, "tasks_per_step": 2})
    b = build_sampler(TASKS, SIZES, LRS, {"kind": "temperature", "alpha": 0.5, "seed": 7, "tasks_per_step": 2})
    forward = [a.tasks_at(step) for step in range(50)]
    backward = [b.tasks_at(step) for step in reversed(range(50))][::-1]  # order of queries is irrelevant
    assert forward == backward and all(len(t) == 2 for t in forward)
    other = build_sampler(TASKS, SIZES, LRS, {"kind": "temperature", "alpha": 0.5, "seed": 8, "tasks_per_step": 2})
    assert [other.tasks_at(step) for step in range(50)] != forward


def test_stop_and_go_transitions_on_a_scripted_score_sequence():
    c = PlateauController(patience=1, threshold=0.001, continue_threshold=0.005, cooldown=1)
    script = [
        (0.50, False),  # first score: best
        (0.60, False),  # improves
        (0.6003, False),  # < best * 1.001: 1 bad evaluation (patience 1 tolerates it)
        (0.60, True),  # 2 bad > patience: stop, cooldown 1
        (0.60, True),  # in cooldown: bad ignored; 0.60 is not < 0.6 * 0.995, stays stopped
        (0.59, False),  # fell below best * (1 - 0.005) = 0.597: go again
        (0.61, False),  # new best
    ]
    states = [c.step(score) for score, _ in script]
    assert states == [expected for _, expected in script]
    assert c.best == pytest.approx(0.61)


def test_stopped_task_trains_every_gap_steps_and_resets_after_given_epochs():
    cfg = SamplerConfig(stop_and_go=StopAndGoConfig(train_iter_gap=4, patience=0, cooldown=0, reset_epochs=[1]))
    s = build_sampler(TASKS, SIZES, LRS, cfg)
    s.gate.report("gqa", 0.5)
    assert s.gate.report("gqa", 0.5) is True  # patience 0: the first non-improvement stops it
    assert s.gate.stopped()["gqa"]
    schedule = [s.tasks_at(step) for step in range(8)]
    assert [("gqa" in tasks) for tasks in schedule] == [True, False, False, False, True, False, False, False]
    assert schedule[1] == ["vqa", "refcoco", "nlvr2"]
    assert s.probabilities(1)["gqa"] == 0.0
    assert not s.gate.end_epoch(0) and s.gate.stopped()["gqa"]
    assert s.gate.end_epoch(1) and not s.gate.stopped()["gqa"]


def test_state_dict_resume_reproduces_the_schedule_and_rejects_other_runs():
    cfg = {"kind": "temperature", "alpha": 0.7, "seed": 11, "stop_and_go": {"patience": 0, "cooldown": 0}}
    s = build_sampler(TASKS, SIZES, LRS, cfg)
    s.gate.report("vqa", 0.4)
    s.gate.report("vqa", 0.3)  # vqa stopped
    state = json.loads(json.dumps(s.state_dict()))  # checkpoint client_state is plain data
    resumed = build_sampler(TASKS, SIZES, LRS, cfg)
    resumed.load_state_dict(state)
    assert [resumed.tasks_at(step) for step in range(100, 140)] == [s.tasks_at(step) for step in range(100, 140)]
    assert resumed.gate.stopped() == s.gate.stopped() and resumed.gate.controllers["vqa"].best == 0.4
    with pytest.raises(ValueError, match="does not belong"):
        build_sampler(TASKS, SIZES, LRS, {**cfg, "seed": 12}).load_state_dict(state)


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="sampler.kind"):
        SamplerConfig(kind="random")
    with pytest.raises(ValueError, match="train_iter_gap"):
        StopAndGoConfig(train_iter_gap=0)
    with pytest.raises(ValueError, match="no training examples"):
        build_sampler(["vqa"], {"vqa": 0}, {"vqa": 1e-5})


def test_eval_due_follows_the_original():
    assert [s for s in range(13) if eval_due(s, 4, final_step=12)] == [4, 8, 12]
    assert eval_due(7, 100, final_step=7)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_ranks_draw_the_same_tasks_without_communication(tmp_path):
    """Two real gloo ranks compute their schedules independently, then compare via all_gather."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch.distributed as dist
        from vilbert_ds.tasks.sampler import build_sampler
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path}/rendezvous", rank=rank, world_size=2)
        s = build_sampler({TASKS!r}, {SIZES!r}, {LRS!r}, {{"kind": "temperature", "alpha": 0.5, "seed": 5}})
        mine = [s.tasks_at(step) for step in range(200)]
        both = [None, None]
        dist.all_gather_object(both, mine)
        dist.destroy_process_group()
        sys.exit(0 if both[0] == both[1] and len(set(t for x in mine for t in x)) > 1 else 3)
    """))
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env) for r in range(2)]
    try:
        codes = [p.wait(timeout=100) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
