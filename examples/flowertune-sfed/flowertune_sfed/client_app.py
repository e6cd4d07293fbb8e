"""flowertune-sfed: the ClientApp, Flower's FlowerTune client keeping its LoRA B across rounds."""

import os
import warnings

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import unflatten_dict
from omegaconf import DictConfig
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from trl import SFTConfig, SFTTrainer

from flowertune_sfed.dataset import get_tokenizer, load_data, replace_keys
from flowertune_sfed.models import cosine_annealing, get_model
from sfedlora.flower.strategy import clients_per_round, keep_local, merge_local

# Avoid warnings
os.environ["TOKENIZERS_PARALLELISM"] = "true"
os.environ["RAY_DISABLE_DOCKER_CPU_WARNING"] = "1"
warnings.filterwarnings("ignore", category=UserWarning)


# Flower ClientApp
app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    """Train the model on local data."""
    # Parse config
    current_round = msg.content["config"]["server-round"]
    partition_id = context.node_config["partition-id"]
    num_partitions = context.node_config["num-partitions"]
    num_rounds = context.run_config["num-server-rounds"]
    cfg = DictConfig(replace_keys(unflatten_dict(context.run_config)))
    training_arguments = SFTConfig(
        **cfg.train.training_arguments,
        max_length=cfg.train.seq_length,
        output_dir=msg.content["config"]["save_path"],
        report_to="none",
    )

    if cfg.train.get("dynamic_data_seed", False):
        base_seed = int(
            training_arguments.data_seed
            if training_arguments.data_seed is not None
            else training_arguments.seed
        )
        # Keep the partition fixed but change the sampling order each round.
        training_arguments.data_seed = base_seed + current_round - 1

    # Let's get the client partition
    trainset = load_data(partition_id, num_partitions, cfg.dataset.name)
    tokenizer = get_tokenizer(cfg.model.name)

    # Load the model: the server's averaged A, and this node's own B from its Context.state
    model = get_model(cfg.model, clients_per_round(num_partitions, cfg.strategy.fraction_train))
    set_peft_model_state_dict(model, merge_local(msg.content["arrays"], context))
    own_b = [p for name, p in model.named_parameters() if ".lora_B." in name]
    own_b_norm = float(torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in own_b])))

    # Set learning rate for current round
    training_arguments.learning_rate = cosine_annealing(
        current_round,
        num_rounds,
        cfg.train.learning_rate_max,
        cfg.train.learning_rate_min,
    )

    # Construct trainer
    trainer = SFTTrainer(
        model=model,
        args=training_arguments,
        train_dataset=trainset,
        processing_class=tokenizer,
    )

    # Do local training
    results = trainer.train()

    # Save this node's personalised adapter (its B is nowhere else)
    if current_round == num_rounds or current_round % cfg.train.save_every_round == 0:
        model.save_pretrained(
            f"{msg.content['config']['save_path']}/peft_{current_round}/node_{partition_id}"
        )

    # Construct and return reply Message: the arrays the server averages (A); B stays in context.state
    model_record = keep_local(get_peft_model_state_dict(model), context)
    metrics = {
        "train_loss": results.training_loss,
        "own-b-norm": own_b_norm,  # 0 in round 1 (PEFT's init), then this node's own B
        "num-examples": len(trainset),
    }
    metric_record = MetricRecord(metrics)
    content = RecordDict({"arrays": model_record, "metrics": metric_record})
    return Message(content=content, reply_to=msg)
