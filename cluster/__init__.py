"""What runs on Ray workers: data streaming, train loop, DDP/DeepSpeed strategies, checkpoints, Tune, MLflow logging."""
