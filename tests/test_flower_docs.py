"""docs/flower.md's multi-machine recipe, run as a new user would on one machine: its commands
copied from the page, with this machine's address, free ports and temporary paths."""

import re
import subprocess
from pathlib import Path

from safetensors.torch import load_file
from test_flower_deploy import node_data, processes_in, wait_for

from sfedlora.config import build_config, dump_config
from sfedlora.driver.rundir import read_metrics
from sfedlora.flower.deploy import LocalDeployment, free_port

DOC = Path(__file__).resolve().parents[1] / "docs" / "flower.md"


def recipe() -> list[str]:
    """The fenced blocks of the recipe, in order."""
    text = DOC.read_text()
    section = text[text.index("**Across machines: a recipe.**") : text.index("Security, in short:")]
    return [re.sub(r"\\\n\s*", "", block) for block in re.findall(r"```\w+\n(.*?)```", section, re.S)]


def test_the_multi_machine_recipe_runs_on_loopback(tiny_overrides, tmp_path):
    tls_and_link, connection, keys, supernode, job, resume = recipe()
    assert "resume=" in resume  # resuming is tested on a deployment in test_flower_deploy.py
    server, port = tmp_path / "srv", free_port()

    def local(command: str, k: int = 0) -> str:
        """A command as typed on this machine: its address, ports and paths; client ``k``."""
        for a, b in [
            ("10.0.0.5:9092", f"127.0.0.1:{port}"),
            ("--port 9092", f"--port {port}"),
            ("10.0.0.5", "127.0.0.1"),
            ("/srv/sfedlora", str(server)),
            ("node-3", f"node-{k}"),
            ("partition-id=3", f"partition-id={k}"),
            ("/var/sfedlora", str(tmp_path / f"state-{k}")),
            ("/data/sst2-client3", str(tmp_path / "node-data" / f"client_{k}")),
            ("ca.crt --auth", f"{server}/certs/ca.crt --auth"),
        ]:
            command = command.replace(a, b)
        return command

    overrides = [*tiny_overrides, "federation.n_clients=2", "federation.rounds=1", "name=doc"]
    cfg = build_config(overrides=[*overrides, f"output_dir={server / 'runs'}"])
    node_data(cfg, tmp_path / "node-data")
    (server / "logs").mkdir(parents=True)
    (server / "job.yaml").write_text(dump_config(cfg))
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(local(connection))
    link = LocalDeployment(server, 2)  # its process handling only: every command comes from the page
    link.env["FLWR_HOME"] = str(home)
    del link.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"]  # a new user has not set it
    try:
        make_tls, superlink = local(tls_and_link).strip().splitlines()
        subprocess.run(make_tls, shell=True, cwd=server, check=True, env=link.env)
        link.spawn("superlink", ["bash", "-c", superlink])
        for k in range(2):
            keygen, register = local(keys, k).strip().splitlines()
            subprocess.run(keygen.split("#")[0], shell=True, cwd=server, check=True, env=link.env)
            args = register.split("#")[0].split()[1:]
            # The SuperLink may still be starting: the operator tries again.
            wait_for(lambda a=args: link.flwr(*a).returncode == 0, link.processes["superlink"], server, 60)
            link.spawn(
                f"supernode-{k}", ["bash", "-c", local(supernode, k).strip() + f" --port {free_port()}"]
            )
        submit = link.spawn("run", ["bash", "-c", local(job).strip().replace("\n", " && ")])
        submit.wait(timeout=300)
    finally:
        link.stop()
    run_dir = server / "runs" / "doc"
    assert [r["round"] for r in read_metrics(run_dir)] == [1] and (run_dir / "summary.json").is_file()
    for k in range(2):  # each node's own state and personalised adapter, where the page says
        assert (tmp_path / f"state-{k}" / "client_state.pt").is_file()
        assert load_file(tmp_path / f"state-{k}" / "adapters" / f"client_0{k}" / "adapter_model.safetensors")
    assert processes_in(server) == []
