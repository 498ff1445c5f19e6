"""lossguard: stream a training run to lossguardd and apply its advice.

    import lossguard
    # Optional: an LR range test first; lossguardd suggests the initial LR
    # (the model and optimizer are restored afterwards).
    test = lossguard.lr_range_test(model, optimizer, loader, loss_fn)
    for group in optimizer.param_groups:
        group["lr"] = test.suggested_lr

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
generated at build time (build/python/lossguard/v1). `Client` needs only
grpcio and protobuf; `TorchGuard` and `LossGuardCallback` need PyTorch
(`pip install 'lossguard[torch]'`) and are imported on first use.
"""

from lossguard.client import Client, ClientStats, LrSuggestion, suggest_lr


def __getattr__(name):
    # Imported on first use: TorchGuard imports torch, which a client that
    # only reports (JAX, a log forwarder) does not have; LossGuardCallback
    # imports Lightning, when installed, which a plain PyTorch loop should
    # not pay for.
    if name in ("TorchGuard", "LossGuardCallback", "lr_range_test", "RangeTest",
                "RangeTestError"):
        try:
            if name == "TorchGuard":
                from lossguard.torch_guard import TorchGuard as found
            elif name in ("lr_range_test", "RangeTest", "RangeTestError"):
                import lossguard.lr_finder
                found = getattr(lossguard.lr_finder, name)
            else:
                from lossguard.lightning import LossGuardCallback as found
        except ImportError as e:
            if e.name not in ("torch", "torch.distributed"):
                raise
            raise ImportError(
                f"lossguard.{name} needs PyTorch, which is not installed "
                f"(pip install 'lossguard[torch]'); lossguard.Client works "
                f"without it") from e
        return found
    raise AttributeError(f"module 'lossguard' has no attribute {name!r}")


__all__ = ["Client", "ClientStats", "LrSuggestion", "suggest_lr", "TorchGuard",
           "LossGuardCallback", "lr_range_test", "RangeTest", "RangeTestError"]
__version__ = "0.1.0"
