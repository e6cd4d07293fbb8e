"""flowertune-sfed: the strategy, SFed-LoRA's partial averaging with FlowerTune's communication tracking."""

from collections.abc import Iterable
from logging import INFO, WARN

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from sfedlora.flower.strategy import PartialFedAvg


class FlowerTuneSfed(PartialFedAvg):
    """FedAvg over LoRA A only (each node keeps its B), with the server-side checks of
    sfedlora; like Flower's FlowerTuneLlm, it tracks the bytes of the arrays sent each round
    (only A comes back from the nodes: B never leaves them)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.comm_tracker = CommunicationTracker()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)
        self.comm_tracker.track(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.comm_tracker.track(replies)
        return super().aggregate_train(server_round, replies)


class CommunicationTracker:
    """Megabytes of arrays in messages, summed over the run, against the leaderboard's budget."""

    BUDGET_MB = 2e5

    def __init__(self):
        self.curr_comm_cost = 0.0

    def track(self, messages: Iterable[Message]):
        comm_cost = (
            sum(
                record.count_bytes()
                for msg in messages
                if msg.has_content()
                for record in msg.content.array_records.values()
            )
            / 1024**2
        )
        self.curr_comm_cost += comm_cost
        log(
            INFO,
            "Communication budget: used %.2f MB (+%.2f MB this round) / 200,000 MB",
            self.curr_comm_cost,
            comm_cost,
        )
        if self.curr_comm_cost > self.BUDGET_MB:
            log(WARN, "The accumulated communication cost has exceeded 200,000 MB.")
