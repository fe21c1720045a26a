"""Train a small CNN with BatchNorm on scikit-learn's 8x8 digits: a plain PyTorch script
(its own Dataset, model, DataLoader and loop), and the same script on stalwart.

    python examples/train_digits.py --epochs 12
    stalwart run --workers 3 --servers 2 -- python examples/train_digits_stalwart.py --epochs 12
"""

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset


class Digits(Dataset):
    """scikit-learn's 8x8 handwritten digits (shipped with it: nothing is downloaded)."""

    def __init__(self, train: bool):
        x, y = load_digits(return_X_y=True)
        split = 1500
        x, y = (x[:split], y[:split]) if train else (x[split:], y[split:])
        self.x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        self.y = torch.tensor(y, dtype=torch.long)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


@torch.no_grad()
def accuracy(model, loader):
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    model.train()
    return correct / len(loader.dataset)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    train_set, test_set = Digits(train=True), Digits(train=False)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=256)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(args.epochs):
        for step, (x, y) in enumerate(loader):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        acc = accuracy(model, test_loader)
        print(f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {acc:.3f}", flush=True)


if __name__ == "__main__":
    main()
