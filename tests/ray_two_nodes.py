"""The tiny preset's short run on a two-node `ray.cluster_utils.Cluster` (2 logical CPUs per node: 1 trainer
rank and 2 rollout workers cannot fit one node): run by tests/test_cluster.py as
`python -m tests.ray_two_nodes OUT`; writes `OUT/nodes.json` (each actor's node) and the run under OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from dapo.backends import ray as ray_backend
from dapo.config import load_config
from dapo.trainer import train
from tests.test_e2e import SHORT


def main() -> None:
    out = Path(sys.argv[1])
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    nodes.add_node(num_cpus=2)
    nodes.wait_for_nodes()
    ray.init(address=nodes.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    placed: dict[str, str] = {}
    real_close = ray_backend.RayBackend.close

    def remember(self: ray_backend.RayBackend) -> None:
        placed.update(self.nodes)
        real_close(self)

    ray_backend.RayBackend.close = remember  # type: ignore[method-assign]
    cfg = load_config(
        None,
        [*SHORT, "trainer.total_steps=2", "trainer.backend=ray", "rollout.num_workers=2",
         f"trainer.output_dir={out}", "trainer.run_name=two-nodes"],
    )  # fmt: skip
    train(cfg)
    (out / "nodes.json").write_text(
        json.dumps({"placed": placed, "nodes": [n["NodeID"] for n in ray.nodes()]})
    )
    ray.shutdown()
    nodes.shutdown()


if __name__ == "__main__":
    main()
