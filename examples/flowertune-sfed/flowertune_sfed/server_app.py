"""flowertune-sfed: the ServerApp, Flower's FlowerTune server with SFed-LoRA's strategy."""

import json
import os
from datetime import datetime

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.config import unflatten_dict
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from flowertune_sfed.dataset import replace_keys
from flowertune_sfed.models import get_model
from flowertune_sfed.strategy import FlowerTuneSfed
from sfedlora.flower.strategy import clients_per_round

# Create ServerApp
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Main entry point for the ServerApp."""
    # Create output directory given current timestamp
    current_time = datetime.now()
    folder_name = current_time.strftime("%Y-%m-%d_%H-%M-%S")
    save_path = os.path.join(os.getcwd(), f"results/{folder_name}")
    os.makedirs(save_path, exist_ok=True)

    # Read from config
    num_rounds = context.run_config["num-server-rounds"]
    cfg = DictConfig(replace_keys(unflatten_dict(context.run_config)))

    # Get initial model weights, at the γ the nodes train with: N = the replies a round averages
    n_clients = clients_per_round(len(list(grid.get_node_ids())), cfg.strategy.fraction_train)
    init_model = get_model(cfg.model, n_clients)
    arrays = ArrayRecord(get_peft_model_state_dict(init_model))

    # Define strategy
    strategy = FlowerTuneSfed(
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
    )

    # Start strategy, run SFed-LoRA for `num_rounds`
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"save_path": save_path}),
        num_rounds=num_rounds,
        evaluate_fn=get_evaluate_fn(cfg.model, n_clients, cfg.train.save_every_round, num_rounds, save_path),
    )
    # The nodes' training metrics by round, and which replies the server refused (and why)
    with open(f"{save_path}/train_metrics.json", "w") as f:
        rounds = result.train_metrics_clientapp.items()
        json.dump({"train": {r: dict(m) for r, m in rounds}, "refused": strategy.refused}, f, indent=2)


# Get function that will be executed by the strategy
# Here we use it to save the server's A (B there stays PEFT's zero init: each node has its own)
def get_evaluate_fn(model_cfg, n_clients, save_every_round, total_round, save_path):
    """Return an evaluation function for saving the server's arrays."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        # Save model
        if server_round != 0 and (server_round == total_round or server_round % save_every_round == 0):
            # Init model
            model = get_model(model_cfg, n_clients)
            set_peft_model_state_dict(model, arrays.to_torch_state_dict())

            model.save_pretrained(f"{save_path}/peft_{server_round}/server")

        return MetricRecord()

    return evaluate
