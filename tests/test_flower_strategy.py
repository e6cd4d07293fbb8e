"""``PartialFedAvg`` with ``merge_local`` / ``keep_local`` in a plain Flower app (a PEFT model, a few
local SGD steps: no sfedlora client), on Flower's simulation engine."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from sfedlora.flower.strategy import PartialFedAvg, clients_per_round, keep_local, merge_local
from sfedlora.peft import check_model, lora_config

SIZES = [4, 8, 12]  # examples of partition 0, 1, 2: the averaging weights
RANK, ALPHA = 4, 8.0
POISONED = (2, 2)  # (partition, round) whose reply carries a NaN


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


def get_model(n_clients: int):
    torch.manual_seed(0)
    model = get_peft_model(Net(), lora_config(RANK, ALPHA, n_clients, target_modules=["hidden", "out"]))
    check_model(model, ALPHA, n_clients)
    return model


def b_norm(model) -> float:
    return float(sum(p.norm() ** 2 for n, p in model.named_parameters() if "lora_B" in n) ** 0.5)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    partition = context.node_config["partition-id"]
    model = get_model(clients_per_round(context.node_config["num-partitions"], 1.0))
    set_peft_model_state_dict(model, merge_local(msg.content["arrays"], context))
    before = b_norm(model)

    generator = torch.Generator().manual_seed(partition)
    x = torch.randn(SIZES[partition], 4, generator=generator)
    y = x.sum(1, keepdim=True) * (partition + 1) / 4
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()

    state = get_peft_model_state_dict(model)
    if (partition, msg.content["config"]["server-round"]) == POISONED:
        name = next(n for n in state if ".lora_A." in n)
        state[name] = torch.full_like(state[name], float("nan"))
    arrays = keep_local(state, context)
    metrics = {"num-examples": SIZES[partition], "partition": partition, "b-before": before}
    metrics["b-after"] = b_norm(model)
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)


class Recording(PartialFedAvg):
    def __init__(self, seen, **kwargs):
        super().__init__(**kwargs)
        self.seen = seen

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.seen[server_round] = {
            int(m.content["metrics"]["partition"]): (m.content["metrics"], m.content["arrays"])
            for m in replies
        }
        return super().aggregate_train(server_round, replies)


def test_a_plain_flower_app_keeps_b_per_node_and_averages_a_weighted_by_examples():
    outcome, seen = {}, {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = Recording(seen, fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3)
        outcome["initial"] = ArrayRecord(get_peft_model_state_dict(get_model(3)))
        outcome["result"] = strategy.start(grid=grid, initial_arrays=outcome["initial"], num_rounds=2)
        outcome["refused"] = strategy.refused

    run_simulation(server_app=server, client_app=app, num_supernodes=3)

    initial, final = outcome["initial"].to_torch_state_dict(), outcome["result"].arrays.to_torch_state_dict()
    a_names = [n for n in initial if ".lora_A." in n]
    assert a_names and len(a_names) == len(initial) // 2
    for round_, replies in seen.items():
        assert {n for _, arrays in replies.values() for n in arrays} == set(a_names)  # B never left a node
        for partition, (metrics, _) in replies.items():
            # Round 1 starts from the server's zero B; round 2 from the node's own trained B.
            expected = 0.0 if round_ == 1 else seen[1][partition][0]["b-after"]
            assert metrics["b-before"] == expected
    assert len({round(m["b-after"], 6) for m, _ in seen[2].values()}) == 3  # a B of its own per node
    assert [node for node, reason in outcome["refused"][2] if "non-finite" in reason] and not outcome[
        "refused"
    ][1]
    # Round 2's A: partitions 0 and 1 weighted 4 : 8 (partition 2's NaN reply refused).
    for name in a_names:
        a0, a1 = (seen[2][p][1][name].numpy() for p in (0, 1))
        assert torch.allclose(final[name], torch.from_numpy((4 * a0 + 8 * a1) / 12), atol=1e-6)
        assert not torch.equal(final[name], initial[name])
    for name in set(initial) - set(a_names):  # the server's B stays the initial one
        assert torch.equal(final[name], initial[name])
