"""``rlops-operator``'s command line: what it refuses before it talks to any API server."""

import pytest

from rl_operator.__main__ import main
from rl_operator.shards import ray_claim_name


@pytest.mark.parametrize(("argv", "words"), [
    (["--shard", "east"], "--shard needs --namespace"),
    (["--shard", "east", "-n", "team-*"], "name each namespace (no patterns)"),
    (["-n", "team-a", "--peering", "rlops"], "--peering needs the all-namespaces mode"),
])
def test_refused_command_lines_name_the_problem(argv, words, capsys, monkeypatch):
    monkeypatch.delenv("RLOPS_NAMESPACES", raising=False)
    monkeypatch.delenv("RLOPS_SHARD", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_one_ray_cluster_one_claim_whatever_the_trailing_slash():
    a = ray_claim_name("http://ray-a-head-svc.ray.svc:8265")
    assert a == ray_claim_name("http://ray-a-head-svc.ray.svc:8265/")
    assert a != ray_claim_name("http://ray-b-head-svc.ray.svc:8265")
    assert a.startswith("rlops-ray-") and len(a) <= 63
