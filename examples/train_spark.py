"""The digits MLP trained on a Spark DataFrame with `p2pdl.spark.fit`, inside one barrier stage.

    python examples/train_spark.py                          # local-cluster[2,1,1024]
    python examples/train_spark.py --master 'local[2]' --epochs 10

The training rows become a DataFrame (a `features` array column and an integer `label`);
every barrier task trains on its own partition and the nodes AllReduce peer to peer over
encrypted links. The driver gets the trained `state_dict` back, measures the accuracy on the
held-out test set and prints it, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `examples.` importable here too
    sys.path.insert(0, str(ROOT))

from examples.train_digits import SEED, X_TEST, X_TRAIN, Y_TEST, Y_TRAIN, make_model  # noqa: E402
from p2pdl.torch import TorchTask  # noqa: E402

TASK = "examples.train_spark:task"

task = TorchTask(
    model_fn=make_model,
    loss_fn=torch.nn.functional.cross_entropy,
    dataset=None,  # p2pdl.spark.fit hands every node its partition's rows
    optimizer={"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    partitions=1,
    seed=SEED,
    global_batch=64,
    epochs=20,
)
"""The task `fit` trains: model, loss, optimizer, batch and epochs; the data is the DataFrame."""


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--master", default="local-cluster[2,1,1024]", help="Spark master URL")
    parser.add_argument("--nodes", type=int, default=2, help="barrier tasks (default 2)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs (default 20)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    import p2pdl.spark
    from p2pdl.spark import session as spark_session

    spark = spark_session.session(args.master, "p2pdl-train-spark", pythonpath=str(ROOT))
    try:
        rows = [(x.tolist(), int(y)) for x, y in zip(X_TRAIN.numpy(), Y_TRAIN.numpy(), strict=True)]
        df = spark.createDataFrame(rows, "features array<float>, label long")
        start = time.perf_counter()
        result = p2pdl.spark.fit(df, TASK, num_nodes=args.nodes, epochs=args.epochs)
        wall = time.perf_counter() - start
    finally:
        spark_session.stop(spark)
    model = make_model()
    assert result.state_dict is not None
    model.load_state_dict(result.state_dict)
    with torch.no_grad():
        accuracy = float((model(X_TEST).argmax(dim=1) == Y_TEST).float().mean())
    summary = result.summary
    figures = {
        "event": "train_spark",
        "master": args.master,
        "nodes": summary["world_size"],
        "steps": summary["steps"],
        "test_accuracy": round(accuracy, 4),
        "iterations_per_s": summary["iterations_per_s"],
        "train_s": summary["wall_s"],
        "spark_job_s": round(wall, 3),
        "final_loss": summary["loss"],
        "weights_identical": summary["weights_identical"],
    }
    print(
        f"test accuracy {accuracy:.4f}  {summary['iterations_per_s']} iterations/s  "
        f"({figures['nodes']} barrier tasks on {args.master}, {figures['steps']} steps)"
    )
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
