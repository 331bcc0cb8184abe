"""pytorchexample: the model, data and loops of a Flower quickstart app (synthetic data, so
that the app runs offline and in seconds)."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _dataset(seed: int, size: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 8, generator=gen)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """This partition's train and validation loaders."""
    train = DataLoader(_dataset(partition_id, 64), batch_size=batch_size, shuffle=True)
    val = DataLoader(_dataset(1000 + partition_id, 32), batch_size=batch_size)
    return train, val


def load_centralized_dataset() -> DataLoader:
    return DataLoader(_dataset(10_000, 128), batch_size=64)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, device) -> float:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    total, batches = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


def test(model: nn.Module, loader: DataLoader, device) -> tuple[float, float]:
    """Mean loss and accuracy."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x.to(device))
            loss += nn.functional.cross_entropy(out, y.to(device), reduction="sum").item()
            correct += (out.argmax(1) == y.to(device)).sum().item()
            n += len(y)
    return loss / n, correct / n
