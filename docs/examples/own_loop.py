"""Filter grafting in your own training loop: network NET of a ring of NUM, one process each.

    python docs/examples/own_loop.py RUN NET NUM     # RUN: a new folder for each run

After every epoch but the last, each network hands its weights to the next one through files in RUN
and grafts in those of the previous one. The result is RUN/net<NET>.pt.
"""

import sys

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T

from grafting import Grafter

run, net, num = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
epochs = 2
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(net)
data = torchvision.datasets.FakeData(256, (3, 32, 32), 10, transform=T.ToTensor())  # your dataset here
loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True)
model = torchvision.models.resnet18(num_classes=10).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
with Grafter(run, net=net, num=num, model=model) as grafter:  # refuses a folder another run left files in
    for epoch in range(1, epochs + 1):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
        if epoch < epochs:  # the last epoch's weights are the result: nothing is grafted after it
            print(grafter.step(model, epoch).summary(), flush=True)
    grafter.finish()  # reached only when every epoch ran: removes the exchange files, heartbeat and lock
torch.save(model.state_dict(), f"{run}/net{net}.pt")
