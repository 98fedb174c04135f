"""kopf's last-handled state in memory (rl_operator.diffbase): no write to the object."""

from __future__ import annotations

import kopf

from rl_operator import diffbase


def _body(uid: str, spec: dict, annotations: dict | None = None) -> kopf.Body:
    return kopf.Body({"apiVersion": "rlops.dev/v1alpha1", "kind": "RLAgent",
                      "metadata": {"name": "a", "namespace": "t", "uid": uid, "resourceVersion": "7",
                                   "annotations": annotations or {}},
                      "spec": spec, "status": {"phase": "Training"}})


def test_the_essence_is_kept_by_uid_and_nothing_is_patched():
    storage = diffbase.MemoryDiffBaseStorage()
    body = _body("u1", {"env": "CartPole-v1"})
    assert storage.fetch(body=body) is None  # never handled: kopf's "create"
    patch = kopf.Patch()
    essence = storage.build(body=body)
    storage.store(body=body, patch=patch, essence=essence)
    assert not patch  # no PATCH of the object
    assert storage.fetch(body=body) == {"spec": {"env": "CartPole-v1"}}
    assert storage.fetch(body=_body("u2", {"env": "CartPole-v1"})) is None  # another object (same name, new uid)
    assert len(storage) == 1


def test_kopf_bookkeeping_annotations_are_not_part_of_the_essence():
    storage = diffbase.MemoryDiffBaseStorage()
    body = _body("u1", {"env": "x"}, {"kopf.zalando.org/last-handled-configuration": '{"spec":{"env":"old"}}',
                                      "kopf.zalando.org/reconcile_agent": "{}", "rlops.dev/approve": "sha256:ab"})
    assert storage.build(body=body) == {"spec": {"env": "x"}, "metadata": {"annotations": {"rlops.dev/approve": "sha256:ab"}}}
    only_kopf = _body("u1", {"env": "x"}, {"kopf.zalando.org/last-handled-configuration": "{}"})
    assert storage.build(body=only_kopf) == {"spec": {"env": "x"}}  # an empty annotations stanza goes too


def test_a_deleted_object_is_forgotten():
    storage = diffbase.MemoryDiffBaseStorage()
    body = _body("u1", {"env": "x"})
    storage.store(body=body, patch=kopf.Patch(), essence=storage.build(body=body))
    storage.forget("u1")
    storage.forget("never-stored")
    assert storage.fetch(body=body) is None and len(storage) == 0


def test_a_tenants_large_arguments_are_kept_as_a_digest_and_their_change_still_shows():
    storage = diffbase.MemoryDiffBaseStorage()
    kwargs = {f"k{i}": ["x" * 256] * 100 for i in range(32)}
    spec = {"environment": {"id": "CartPole-v1", "kwargs": kwargs}, "algorithm": {"name": "PPO"}}
    essence = storage.build(body=_body("u1", spec))
    assert essence["spec"]["environment"]["kwargs"].startswith("sha256:") and len(str(essence)) < 500
    assert essence["spec"]["algorithm"] == {"name": "PPO"}  # nothing to shrink: as it is
    changed = {**spec, "environment": {"id": "CartPole-v1", "kwargs": {**kwargs, "k0": ["y"]}}}
    assert storage.build(body=_body("u1", changed)) != essence
    assert spec["environment"]["kwargs"] is kwargs  # the object itself is left as it is
