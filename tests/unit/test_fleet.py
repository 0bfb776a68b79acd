"""The fleet file becomes the fake nodes the scheduler sees."""

from __future__ import annotations

import pytest

import localcluster


def test_default_fleet_two_gpu_classes_and_a_cpu_node() -> None:
    nodes = {n["metadata"]["name"]: n for n in localcluster.load_fleet(localcluster.DEFAULT_FLEET)}
    assert sorted(nodes) == ["cpu-0", "gpu-12g-0", "gpu-24g-0"]
    big, small, cpu = nodes["gpu-24g-0"], nodes["gpu-12g-0"], nodes["cpu-0"]
    assert big["status"]["allocatable"]["nvidia.com/gpu"] == "1"
    assert big["metadata"]["labels"]["nvidia.com/gpu.memory"] == "24564"
    assert small["metadata"]["labels"]["nvidia.com/gpu.memory"] == "12288"
    assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in big["spec"]["taints"]
    assert "nvidia.com/gpu" not in cpu["status"]["allocatable"]
    assert all(t["key"] != "nvidia.com/gpu" for t in cpu["spec"]["taints"])
    # kwok manages exactly the nodes carrying its annotation.
    assert all(n["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake" for n in nodes.values())


def test_groups_expand_by_count_and_allow_other_gpu_resources(tmp_path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        "nodes:\n"
        "  - name: mig\n"
        "    count: 3\n"
        "    gpu: {count: 7, resource: nvidia.com/mig-1g.10gb, product: NVIDIA-A100, memoryMiB: 10240, taint: false}\n"
    )
    nodes = localcluster.load_fleet(fleet)
    assert [n["metadata"]["name"] for n in nodes] == ["mig-0", "mig-1", "mig-2"]
    assert nodes[0]["status"]["capacity"]["nvidia.com/mig-1g.10gb"] == "7"
    assert all(t["key"] != "nvidia.com/gpu" for t in nodes[0]["spec"]["taints"])


def test_duplicate_node_names_are_refused(tmp_path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("nodes:\n  - {name: a, count: 2}\n  - {name: a, count: 1}\n")
    with pytest.raises(localcluster.ClusterError, match="not unique"):
        localcluster.load_fleet(fleet)


def test_commands_bind_only_to_the_configured_host() -> None:
    cfg = localcluster.ClusterConfig(ports=localcluster.Ports.from_base(20000))
    for argv in localcluster.commands(cfg).values():
        for arg in argv:
            assert "0.0.0.0" not in arg  # noqa: S104 - asserting it is absent
    apiserver = localcluster.commands(cfg)["kube-apiserver"]
    assert "--secure-port=20002" in apiserver and "--advertise-address=127.0.0.1" in apiserver
