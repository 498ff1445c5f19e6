"""lossguard: stream a training run to lossguardd and apply its advice.

    import lossguard
    client = lossguard.Client("127.0.0.1:7077", run_id="my-run", mode="auto")
    guard = lossguard.TorchGuard(optimizer, client)
    for step, (x, y) in enumerate(loader):
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        guard.after_backward(step, loss)   # grad norm, clip, report, act
        optimizer.step()
        if guard.should_stop:
            break
    client.finish()

The wire contract is lossguard/v1/lossguard.proto; its Python stubs are
generated at build time (build/python/lossguard/v1).
"""

from lossguard.client import Client, ClientStats
from lossguard.torch_guard import TorchGuard


def __getattr__(name):
    # Imported on first use: lossguard.lightning imports Lightning, when
    # installed, which a plain PyTorch loop should not pay for.
    if name == "LossGuardCallback":
        from lossguard.lightning import LossGuardCallback
        return LossGuardCallback
    raise AttributeError(f"module 'lossguard' has no attribute {name!r}")


__all__ = ["Client", "ClientStats", "TorchGuard", "LossGuardCallback"]
__version__ = "0.1.0"
