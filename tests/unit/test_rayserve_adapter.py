"""Unit tests of the pure parts of the operator's Ray Serve adapter (``rl_operator.rayserve``).

The HTTP parts are exercised against a real Ray Serve in ``tests/e2e/test_serving.py``.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest

from rl_operator import rayserve as rs

FP1 = "sha256:" + "1" * 64
FP2 = "sha256:" + "2" * 64
VERSIONS = {"v1": {"artifactURI": "file:///a/v1", "fingerprint": FP1},
            "v2": {"artifactURI": "file:///a/v2", "fingerprint": FP2}}


def details(*apps, **extra):
    """A GET /api/serve/applications/ answer holding ``apps`` (deployed configs)."""
    out = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8123},
        "grpc_options": {"port": 9000, "grpc_servicer_functions": []},
        "target_capacity": None,
        "controller_info": {"actor_id": "x"},
        "applications": {a["name"]: {"status": "RUNNING", "message": "", "deployed_app_config": a,
                                     "deployments": {}, "source": "declarative"} for a in apps},
    }
    out.update(extra)
    return out


OTHER = {"name": "other", "route_prefix": "/other", "import_path": "x.y:app",
         "runtime_env": {"env_vars": {"A": "1"}}, "args": {"k": [1, 2]},
         "deployments": [{"name": "d", "num_replicas": 2, "user_config": {"q": 1}}]}


def test_app_config_layout():
    cfg = rs.app_config("default", "cartpole", VERSIONS, {"v1": 90, "v2": 10})
    assert cfg == {
        "name": "default.cartpole",
        "route_prefix": "/default/cartpole",
        "import_path": "rl_engine.serving.app:build_app",
        "args": {"agent": "cartpole", "namespace": "default", "versions": VERSIONS,
                 "maxBatchSize": 32, "batchWaitTimeoutS": 0.002,
                 "feedback": {"rewardMin": -1.0, "rewardMax": 1.0, "ttlSeconds": 600, "perClientPerMinute": 600,
                              "clientHeader": ""}},
        "deployments": [{"name": "router", "user_config": {"weights": {"v1": 90, "v2": 10}}}],
    }
    assert rs.app_name("default", "cartpole") == "default.cartpole"


def test_app_config_feedback_args_are_what_the_router_accepts():
    from rl_engine.serving.config import FeedbackConfig, parse_args

    key = "3c" * 32
    cfg = rs.app_config("default", "cartpole", VERSIONS, {"v1": 100}, feedback_key=key, reward_min=0, reward_max=5,
                        feedback_ttl_seconds=120, feedback_per_client_per_minute=30,
                        feedback_client_header="X-Client-Id")
    assert cfg["args"]["feedback"] == {"key": key, "rewardMin": 0.0, "rewardMax": 5.0, "ttlSeconds": 120,
                                       "perClientPerMinute": 30, "clientHeader": "X-Client-Id"}
    assert parse_args(cfg["args"]).feedback == FeedbackConfig(bytes.fromhex(key), 0.0, 5.0, 120, 30, "X-Client-Id")
    # Without a key the router refuses all feedback (503): the args say so by having no key.
    assert parse_args(rs.app_config("default", "cartpole", VERSIONS, {"v1": 100})["args"]).feedback.key is None


@pytest.mark.parametrize("kwargs, fragment", [
    ({"feedback_key": "not-hex" * 8}, "feedback_key: must be"),
    ({"feedback_key": "ab" * 8}, "feedback_key: must be"),
    ({"feedback_key": "AB" * 32}, "feedback_key: must be"),
    ({"reward_min": 1.0, "reward_max": 1.0}, "reward_min < reward_max"),
    ({"reward_max": float("nan")}, "reward_min < reward_max"),
    ({"reward_min": float("-inf")}, "reward_min < reward_max"),
    ({"feedback_ttl_seconds": 0}, "feedback_ttl_seconds"),
    ({"feedback_ttl_seconds": 60.0}, "feedback_ttl_seconds"),
    ({"feedback_per_client_per_minute": -1}, "args.feedback.perClientPerMinute: must be an integer in [0, 1000000]"),
    ({"feedback_per_client_per_minute": 10.0}, "args.feedback.perClientPerMinute: must be an integer"),
    ({"feedback_per_client_per_minute": True}, "args.feedback.perClientPerMinute: must be an integer"),
    ({"feedback_client_header": "X Client"}, "args.feedback.clientHeader: must be empty (the source address) or an "
                                             "HTTP header name"),
    ({"feedback_client_header": "X-Id:"}, "args.feedback.clientHeader"),
    ({"feedback_client_header": None}, "args.feedback.clientHeader"),
])
def test_app_config_refuses_invalid_feedback_settings(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)) as exc:
        rs.app_config("default", "cartpole", VERSIONS, {"v1": 100}, **kwargs)
    assert "not-hex" not in str(exc.value)  # the key is never repeated


def test_app_config_options_missing_weights_and_tuple_versions():
    cfg = rs.app_config("ns", "a", {"v1": ("file:///x", FP1), "v2": ("file:///y", None)}, {"v1": 100},
                        route_prefix="/custom", max_batch_size=8, batch_wait_timeout_s=0.01)
    assert cfg["route_prefix"] == "/custom"
    assert cfg["args"]["versions"] == {"v1": {"artifactURI": "file:///x", "fingerprint": FP1},
                                       "v2": {"artifactURI": "file:///y"}}
    assert cfg["args"]["maxBatchSize"] == 8 and cfg["args"]["batchWaitTimeoutS"] == 0.01
    assert rs.application_weights(cfg) == {"v1": 100, "v2": 0}
    assert rs.application_versions(cfg) == ["v1", "v2"]


@pytest.mark.parametrize("weights, fragment", [
    ({"v1": 90}, "sum to 100, got 90"),
    ({"v1": 50, "v2": 60}, "sum to 100"),
    ({"v3": 100}, "weights.v3: not a version"),
    ({"v1": 100.0}, "integer percent"),
    ({"v1": True, "v2": 99}, "integer percent"),
    ({"v1": -10, "v2": 110}, "integer percent"),
    ([("v1", 100)], "mapping"),
])
def test_invalid_weights(weights, fragment):
    with pytest.raises(ValueError, match=fragment):
        rs.app_config("ns", "a", VERSIONS, weights)


@pytest.mark.parametrize("versions, fragment", [
    ({}, "at least one version"),
    ({"v1": {"uri": "file:///x"}}, "unknown field"),
    ({"v1": {"fingerprint": FP1}}, "artifactURI: required"),
    ({"v1": {"artifactURI": "file:///x", "fingerprint": "md5:1"}}, "sha256"),
    ({"v1": "file:///x"}, "must be"),
])
def test_invalid_versions(versions, fragment):
    with pytest.raises(ValueError, match=fragment):
        rs.app_config("ns", "a", versions, {"v1": 100})


def test_normalize_weights_orders_by_versions():
    assert list(rs.normalize_weights({"b": 100}, ["a", "b", "c"]).items()) == [("a", 0), ("b", 100), ("c", 0)]


def test_deploy_body_keeps_everything_as_submitted():
    ours = rs.app_config("ns", "a", VERSIONS, {"v1": 100})
    d = details(OTHER, ours, target_capacity=50)
    body = rs.deploy_body(d)
    assert body == {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": 8123},
                    "grpc_options": {"port": 9000, "grpc_servicer_functions": []}, "target_capacity": 50,
                    "applications": [OTHER, ours]}
    body["applications"][0]["args"]["k"].append(3)
    assert d["applications"]["other"]["deployed_app_config"]["args"]["k"] == [1, 2], "must copy"


def test_deploy_body_drops_deleting_apps_and_refuses_imperative_ones():
    d = details(OTHER)
    d["applications"]["going"] = {"status": "DELETING", "deployed_app_config": {"name": "going"}}
    assert [a["name"] for a in rs.deploy_body(d)["applications"]] == ["other"]
    d["applications"]["imperative"] = {"status": "RUNNING", "deployed_app_config": None, "source": "imperative"}
    with pytest.raises(rs.RayServeError, match="'imperative' was not deployed through the declarative API"):
        rs.deploy_body(d)


def test_deploy_body_of_an_empty_serve():
    assert rs.deploy_body({"applications": {}}) == {"applications": []}


def test_with_application_inserts_or_replaces_in_place():
    ours = rs.app_config("ns", "a", VERSIONS, {"v1": 100})
    body = rs.deploy_body(details(OTHER))
    added = rs.with_application(body, ours)
    assert [a["name"] for a in added["applications"]] == ["other", "ns.a"]
    assert body["applications"] == [OTHER], "input unchanged"
    newer = rs.app_config("ns", "a", VERSIONS, {"v2": 100})
    replaced = rs.with_application(rs.with_application(added, OTHER), newer)
    assert replaced["applications"] == [OTHER, newer]
    assert replaced["http_options"] == body["http_options"]


def test_without_application():
    ours = rs.app_config("ns", "a", VERSIONS, {"v1": 100})
    body = rs.deploy_body(details(OTHER, ours))
    assert rs.without_application(body, "ns.a")["applications"] == [OTHER]
    assert rs.without_application(body, "absent")["applications"] == [OTHER, ours]
    assert body["applications"] == [OTHER, ours]


def test_with_weights_changes_only_the_router_user_config():
    ours = rs.app_config("ns", "a", VERSIONS, {"v1": 90, "v2": 10})
    ours["deployments"].append({"name": "policy-v1", "max_ongoing_requests": 5})
    before = copy.deepcopy(ours)
    changed = rs.with_weights(ours, {"v2": 100})
    assert ours == before, "input unchanged"
    assert changed["deployments"][0] == {"name": "router", "user_config": {"weights": {"v1": 0, "v2": 100}}}
    without = {k: v for k, v in changed.items() if k != "deployments"}
    assert without == {k: v for k, v in before.items() if k != "deployments"}
    assert changed["deployments"][1:] == before["deployments"][1:]


def test_with_weights_adds_a_router_entry_and_validates():
    ours = rs.app_config("ns", "a", VERSIONS, {"v1": 100})
    ours["deployments"] = []
    assert rs.application_weights(ours) is None
    assert rs.application_weights(rs.with_weights(ours, {"v1": 50, "v2": 50})) == {"v1": 50, "v2": 50}
    with pytest.raises(ValueError, match="sum to 100"):
        rs.with_weights(ours, {"v1": 50})
    with pytest.raises(ValueError, match="not an rlops application"):
        rs.with_weights(OTHER, {"v1": 100})


def test_application_summary():
    d = details(OTHER)
    d["applications"]["other"]["deployments"] = {"d": {
        "status": "HEALTHY", "status_trigger": "CONFIG_UPDATE_COMPLETED", "message": "",
        "deployment_config": {"user_config": {"q": 1}}, "target_num_replicas": 1,
        "replicas": [{"replica_id": "r1", "actor_id": "a1", "pid": 42, "state": "RUNNING",
                      "start_time_s": 1.0, "node_ip": "x"}]}}
    s = rs.application_summary(d, "other")
    assert s["status"] == "RUNNING" and s["config"] == OTHER
    assert s["deployments"]["d"]["replicas"] == [
        {"replica_id": "r1", "actor_id": "a1", "pid": 42, "state": "RUNNING", "start_time_s": 1.0}]
    assert s["deployments"]["d"]["user_config"] == {"q": 1}
    assert rs.application_summary(d, "absent") is None


def test_is_subset_matches_named_lists_by_name():
    ours = rs.app_config("ns", "a", VERSIONS, {"v1": 100})
    deployed = copy.deepcopy(ours)
    deployed["deployments"].insert(0, {"name": "policy-v1", "num_replicas": 1})
    deployed["runtime_env"] = {}
    assert rs._is_subset(ours, deployed)
    assert not rs._is_subset(rs.with_weights(ours, {"v2": 100}), deployed)


def test_unreachable_dashboard_is_a_clear_error():
    with pytest.raises(rs.RayServeUnavailable, match=r"GET http://127\.0\.0\.1:9/api/serve/applications/"):
        rs.get_applications("http://127.0.0.1:9", timeout=2)


def test_the_adapter_imports_neither_ray_nor_torch():
    code = "import sys, rl_operator.rayserve; print(sorted(m for m in ('ray', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_failure_message_keeps_the_reason_not_the_traceback():
    summary = {"message": "Failed to update the deployments ['policy-v1'].", "deployments": {
        "router": {"status": "HEALTHY", "message": ""},
        "policy-v1": {"status": "DEPLOY_FAILED", "message": (
            "The deployment failed to start 3 times in a row. Error:\n\x1b[36mray::ServeReplica\x1b[39m (pid=1)\n"
            '  File "replica.py", line 1, in initialize\n    raise\n'
            "RuntimeError: version v1: artifact file:///a has fingerprint sha256:1, expected sha256:2\n")}}}
    text = rs.failure_message(summary)
    assert text == ("Failed to update the deployments ['policy-v1']. | policy-v1: The deployment failed to start "
                    "3 times in a row. Error: ... RuntimeError: version v1: artifact file:///a has fingerprint "
                    "sha256:1, expected sha256:2")
    assert rs.failure_message({"message": "", "deployments": {}}) == "(no message)"
    assert len(rs.failure_message({"message": "x" * 5000}, limit=100)) == 100


def test_app_config_pins_artifacts_under_the_operators_root():
    """The operator passes its artifact root; the serving side refuses URIs outside it."""
    from rl_engine.serving.config import ServingConfigError, parse_args

    entry = {"artifactURI": "file:///var/lib/rlops/artifacts/ml/pole/pole-2-0a1b2c3d",
             "fingerprint": "sha256:" + "a" * 64}
    cfg = rs.app_config("ml", "pole", {"pole-2": entry}, {"pole-2": 100},
                              artifact_root="file:///var/lib/rlops/artifacts")
    assert cfg["args"]["artifactRoot"] == "file:///var/lib/rlops/artifacts"
    parse_args(cfg["args"])
    outside = {**entry, "artifactURI": "file:///var/lib/rlops/artifacts/other/pole/pole-2-0a1b2c3d"}
    bad = rs.app_config("ml", "pole", {"pole-2": outside}, {"pole-2": 100},
                              artifact_root="file:///var/lib/rlops/artifacts")
    with pytest.raises(ServingConfigError, match="pole-2"):
        parse_args(bad["args"])
    assert "artifactRoot" not in rs.app_config("ml", "pole", {"pole-2": entry}, {"pole-2": 100})["args"]
