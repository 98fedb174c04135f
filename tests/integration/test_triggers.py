"""Training triggers, concurrency policy, run history and suspend, on a real API server
(docs/lifecycle.md).

The agents select a node label nothing carries, so their runs stay Pending: what counts here is
which runs the operator makes, supersedes and deletes. The resync period is 5 s in the tests.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import urlparse

from support import PENDING_AGENT as AGENT, stage_chain, wait_for

FP = "sha256:" + "c" * 64


def runs(cluster, namespace, agent):
    items = cluster.get("trainingruns", "-n", namespace, "-l", f"rlops.dev/agent={agent}")["items"]
    return {r["metadata"]["name"]: r for r in items}


def phase_of(run):
    return (run.get("status") or {}).get("phase")


def condition(cluster, namespace, agent, kind):
    status = cluster.get("rlagent", agent, "-n", namespace).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == kind), None)


def annotate(cluster, namespace, agent, value):
    cluster.kubectl("annotate", "rlagent", agent, "-n", namespace, f"rlops.dev/retrain={value}", "--overwrite")


def test_manual_retrain_one_run_per_new_value(cluster, operator, namespace):
    assert cluster.apply(AGENT.format(name="m", extra="  concurrencyPolicy: Allow\n"), namespace).returncode == 0
    wait_for(lambda: "m-1" in runs(cluster, namespace, "m"), 60, "run m-1")
    annotate(cluster, namespace, "m", "first")
    run = wait_for(lambda: runs(cluster, namespace, "m").get("m-1-1"), 30, "run m-1-1")
    assert run["spec"]["trigger"] == {"reason": "Manual", "agentGeneration": 1, "ordinal": 1, "nonce": "first"}
    wait_for(lambda: cluster.get("job", "m-1-1", "-n", namespace), 30, "its Job")
    wait_for(lambda: (cluster.get("rlagent", "m", "-n", namespace).get("status") or {}).get("lastRetrain") == "first",
             30, "status.lastRetrain")
    # the same value again (any other annotation change): no run
    cluster.kubectl("annotate", "rlagent", "m", "-n", namespace, "unrelated=1")
    annotate(cluster, namespace, "m", "first")
    # a new value: one more run, and the older ones keep running (Allow)
    annotate(cluster, namespace, "m", "second")
    wait_for(lambda: "m-1-2" in runs(cluster, namespace, "m"), 30, "run m-1-2")
    found = runs(cluster, namespace, "m")
    assert sorted(found) == ["m-1", "m-1-1", "m-1-2"]
    assert all(phase_of(r) == "Pending" for r in found.values())
    events = cluster.get("events", "-n", namespace, "--field-selector", "involvedObject.name=m")["items"]
    assert any(e["reason"] == "TrainingRunCreated" and "m-1-2 (Manual" in e["message"] for e in events)


def test_replace_supersedes_the_run_in_progress(cluster, operator, namespace):
    """The default concurrencyPolicy: a spec change while a run is still Pending (no node takes
    its pod) supersedes it: its Job goes, and it says by which run."""
    assert cluster.apply(AGENT.format(name="r", extra=""), namespace).returncode == 0
    wait_for(lambda: cluster.get("job", "r-1", "-n", namespace), 60, "Job r-1")
    cluster.kubectl("patch", "rlagent", "r", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"training": {"totalTimesteps": 40960}}}')
    wait_for(lambda: cluster.get("job", "r-2", "-n", namespace), 60, "Job r-2")
    old = wait_for(lambda: (r := runs(cluster, namespace, "r").get("r-1")) and phase_of(r) == "Superseded" and r,
                   30, "r-1 Superseded")
    cond = next(c for c in old["status"]["conditions"] if c["type"] == "Superseded")
    assert cond["reason"] == "SpecChanged" and "superseded by TrainingRun r-2" in cond["message"]
    wait_for(lambda: cluster.get("job", "r-1", "-n", namespace) is None, 30, "Job r-1 deleted")
    new = runs(cluster, namespace, "r")["r-2"]
    assert new["spec"]["trigger"]["reason"] == "SpecChanged" and phase_of(new) == "Pending"
    assert cluster.get("rlagent", "r", "-n", namespace)["status"]["latestRun"] == "r-2"


def test_forbid_waits_for_the_run_in_progress(cluster, operator, namespace):
    assert cluster.apply(AGENT.format(name="f", extra="  concurrencyPolicy: Forbid\n"), namespace).returncode == 0
    wait_for(lambda: "f-1" in runs(cluster, namespace, "f"), 60, "run f-1")
    annotate(cluster, namespace, "f", "now")
    cond = wait_for(lambda: (c := condition(cluster, namespace, "f", "TriggerWaiting")) and c["status"] == "True" and c,
                    30, "TriggerWaiting")
    assert cond["reason"] == "ConcurrencyPolicy" and "waits for f-1" in cond["message"], cond
    assert sorted(runs(cluster, namespace, "f")) == ["f-1"]
    # f-1 ends (here: its status set by hand): the waiting trigger starts its run
    cluster.kubectl("patch", "trainingrun", "f-1", "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": {"phase": "Failed", "failureReason": "Test"}}))
    run = wait_for(lambda: runs(cluster, namespace, "f").get("f-1-1"), 30, "run f-1-1 after f-1 ended")
    assert run["spec"]["trigger"]["reason"] == "Manual"
    wait_for(lambda: condition(cluster, namespace, "f", "TriggerWaiting")["status"] == "False", 30, "nothing waits")


def test_schedule_starts_a_run_at_the_next_time(cluster, operator, namespace):
    """Every minute, in a time zone: the schedule counts from when the operator first sees it;
    the next minute starts one run, whose trigger names the scheduled time."""
    extra = ("  concurrencyPolicy: Allow\n"
             "  triggers: {schedule: {cron: '* * * * *', timeZone: Asia/Kolkata}}\n")
    assert cluster.apply(AGENT.format(name="s", extra=extra), namespace).returncode == 0
    seen = wait_for(lambda: (cluster.get("rlagent", "s", "-n", namespace).get("status") or {}).get("lastScheduleTime"),
                    30, "status.lastScheduleTime (the schedule seen)")
    scheduled = wait_for(lambda: [r for r in runs(cluster, namespace, "s").values()
                                  if r["spec"]["trigger"]["reason"] == "Scheduled"], 90, "a Scheduled run")
    (run,) = scheduled
    at = run["spec"]["trigger"]["scheduledTime"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00Z", at) and at > seen, (at, seen)
    assert run["metadata"]["name"] == "s-1-1"
    recorded = wait_for(lambda: (t := cluster.get("rlagent", "s", "-n", namespace)["status"]["lastScheduleTime"]) != seen
                        and t, 30, "status.lastScheduleTime recorded")
    assert recorded == at


def test_an_invalid_time_zone_is_a_condition(cluster, operator, namespace):
    bad = AGENT.format(name="z", extra="  triggers: {schedule: {cron: '0 2 * * *', timeZone: Mars/Olympus}}\n")
    assert cluster.apply(bad, namespace).returncode == 0
    cond = wait_for(lambda: condition(cluster, namespace, "z", "TriggerInvalid"), 30, "TriggerInvalid")
    assert cond["status"] == "True" and "spec.triggers.schedule.timeZone" in cond["message"]


def test_a_malformed_cron_is_refused_at_admission(cluster, operator, namespace):
    proc = cluster.apply(AGENT.format(name="c", extra="  triggers: {schedule: {cron: 'every day'}}\n"), namespace)
    assert proc.returncode != 0 and "spec.triggers.schedule.cron" in proc.stderr, proc.stderr


def test_history_limits_delete_the_oldest_finished_runs(cluster, operator, namespace):
    """failedRunsHistoryLimit 1: of the runs superseded one after another, only the newest stays
    beside the latest run."""
    assert cluster.apply(AGENT.format(name="h", extra="  failedRunsHistoryLimit: 1\n"), namespace).returncode == 0
    wait_for(lambda: "h-1" in runs(cluster, namespace, "h"), 60, "run h-1")
    for i, value in enumerate(["a", "b", "c"], start=1):
        annotate(cluster, namespace, "h", value)
        wait_for(lambda: f"h-1-{i}" in runs(cluster, namespace, "h"), 30, f"run h-1-{i}")
    wait_for(lambda: sorted(runs(cluster, namespace, "h")) == ["h-1-2", "h-1-3"], 30,
             "only the newest Superseded run and the latest")
    assert phase_of(runs(cluster, namespace, "h")["h-1-2"]) == "Superseded"
    wait_for(lambda: cluster.get("job", "h-1", "-n", namespace) is None, 30, "h-1's Job gone with it")


def test_suspend_starts_no_run_until_resumed(cluster, operator, namespace):
    assert cluster.apply(AGENT.format(name="p", extra="  suspend: true\n"), namespace).returncode == 0
    cond = wait_for(lambda: condition(cluster, namespace, "p", "TriggerWaiting"), 30, "TriggerWaiting")
    assert cond["reason"] == "Suspended" and "spec.suspend" in cond["message"]
    assert runs(cluster, namespace, "p") == {}
    cluster.kubectl("patch", "rlagent", "p", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    run = wait_for(lambda: runs(cluster, namespace, "p").get("p-2"), 30, "run p-2 once resumed")
    assert run["spec"]["trigger"]["reason"] == "Created"


def test_an_unapproved_rollout_is_superseded_by_a_newer_runs(cluster, operator, namespace):
    assert cluster.apply(AGENT.format(name="g", extra=""), namespace).returncode == 0
    wait_for(lambda: "g-1" in runs(cluster, namespace, "g"), 60, "run g-1")
    stage_chain(cluster, namespace, "g", "g-7", operator.artifact_root, FP, generation=7)
    wait_for(lambda: (cluster.get("rollout", "g-7", "-n", namespace).get("status") or {}).get("phase")
             == "AwaitingApproval", 60, "g-7 AwaitingApproval")
    stage_chain(cluster, namespace, "g", "g-8", operator.artifact_root, "sha256:" + "b" * 64, generation=8)
    old = wait_for(lambda: (ro := cluster.get("rollout", "g-7", "-n", namespace)) and
                   (ro.get("status") or {}).get("phase") == "Superseded" and ro, 60, "g-7 Superseded")
    assert "superseded by Rollout g-8" in old["status"]["message"]
    # an approval that comes after changes nothing: the Rollout stays Superseded, unapproved
    cluster.kubectl("annotate", "rollout", "g-7", "-n", namespace, f"rlops.dev/approve={FP}")
    time.sleep(3)
    status = cluster.get("rollout", "g-7", "-n", namespace)["status"]
    assert status["phase"] == "Superseded" and "approval" not in status
    assert cluster.get("rollout", "g-8", "-n", namespace)["status"]["phase"] == "AwaitingApproval"


def test_a_run_that_succeeds_while_suspended_gets_its_rollout_on_resume(cluster, operator, namespace):
    assert cluster.apply(AGENT.format(name="q", extra=""), namespace).returncode == 0
    wait_for(lambda: "q-1" in runs(cluster, namespace, "q"), 60, "run q-1")
    cluster.kubectl("patch", "rlagent", "q", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    stage_chain(cluster, namespace, "q", "q-7", operator.artifact_root, FP, generation=7, rollout=False)
    time.sleep(3)
    assert cluster.get("rollout", "q-7", "-n", namespace) is None
    cluster.kubectl("patch", "rlagent", "q", "-n", namespace, "--type=merge", "-p", '{"spec": {"suspend": false}}')
    ro = wait_for(lambda: cluster.get("rollout", "q-7", "-n", namespace), 30, "Rollout q-7 once resumed")
    assert ro["spec"]["fingerprint"] == FP


def test_delete_policy_reclaims_the_artifacts_of_expired_runs(cluster, operator, namespace):
    """artifactReclaimPolicy Delete, successfulRunsHistoryLimit 1: the older of two Succeeded runs
    is deleted, and a Job that runs on the dev node deletes its artifact directory; the newer
    run's artifact stays."""
    extra = "  successfulRunsHistoryLimit: 1\n  artifactReclaimPolicy: Delete\n"
    assert cluster.apply(AGENT.format(name="rc", extra=extra), namespace).returncode == 0
    wait_for(lambda: "rc-1" in runs(cluster, namespace, "rc"), 60, "run rc-1")
    dirs: dict[str, Path] = {}

    def artifact(name):
        def write(uri):
            dirs[name] = Path(urlparse(uri).path)
            dirs[name].mkdir(parents=True)
            (dirs[name] / "model.pt").write_bytes(b"weights")
            return FP
        return write

    old = stage_chain(cluster, namespace, "rc", "rc-old", operator.artifact_root, artifact("rc-old"), generation=98)
    old_uid = old["metadata"]["ownerReferences"][0]["uid"]
    stage_chain(cluster, namespace, "rc", "rc-new", operator.artifact_root, artifact("rc-new"), generation=99)
    wait_for(lambda: "rc-old" not in runs(cluster, namespace, "rc"), 60, "rc-old deleted over the history limit")
    job = wait_for(lambda: (j := cluster.get("job", f"rlops-reclaim-{old_uid}", "-n", namespace))
                   and (j.get("status") or {}).get("succeeded") and j, 120, "the reclaim Job succeeded")
    assert "rlops.dev/training-run" not in job["metadata"]["labels"]
    assert not dirs["rc-old"].exists(), "the expired run's artifact is still there"
    assert (dirs["rc-new"] / "model.pt").exists(), "the kept run's artifact was touched"
    assert "rc-new" in runs(cluster, namespace, "rc")
    reasons = [e["reason"] for e in cluster.get("events", "-n", namespace)["items"]
               if e["involvedObject"]["name"] == "rc"]
    assert reasons.count("ArtifactReclaimed") == 1
